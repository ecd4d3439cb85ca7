//! Images: list, import a container image archive, delete.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use futures_util::StreamExt;
use hatch_image::{Image, ImageError};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use super::App;
use crate::error::ApiError;

fn image_error(e: ImageError) -> ApiError {
    match e {
        ImageError::InvalidInput(m) => ApiError::Invalid(m),
        e @ ImageError::InvalidName(_) => ApiError::Invalid(e.to_string()),
        ImageError::AlreadyExists(name) => {
            ApiError::conflict(format!("image '{name}' already exists"))
        }
        ImageError::NotFound(name) => ApiError::not_found("image", &name),
        other => ApiError::Internal(anyhow::Error::new(other)),
    }
}

fn describe(image: &Image) -> Value {
    json!({
        "name": image.name,
        "kind": if image.app.is_some() { "container" } else { "vm" },
        "disk_mib": image.disk_mib,
        "created_at": image.created_at,
        "app": image.app,
    })
}

#[utoipa::path(get, path = "/images", operation_id = "listImages", tag = "images",
    responses((status = 200, description = "{\"images\": [{name, kind, disk_mib, created_at, app?}]}")))]
pub async fn list(State(app): App) -> Result<Json<Value>, ApiError> {
    let images = app.vms.images.list().map_err(image_error)?;
    Ok(Json(
        json!({ "images": images.iter().map(describe).collect::<Vec<_>>() }),
    ))
}

#[derive(Deserialize)]
pub struct ImportQuery {
    name: String,
}

#[utoipa::path(post, path = "/images", operation_id = "importImage", tag = "images",
    params(("name" = String, Query, description = "the new image's name")),
    request_body(content = Vec<u8>, content_type = "application/x-tar",
        description = "an OCI image layout archive or a docker-save archive (linux/amd64)"),
    responses((status = 201, description = "the image"), (status = 409), (status = 422)))]
pub async fn import(
    State(app): App,
    Query(q): Query<ImportQuery>,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    hatch_image::validate_image_name(&q.name).map_err(image_error)?;
    let upload = app
        .vms
        .images
        .staging_dir()
        .join(format!(".upload-{}.tar", crate::manager::new_id("image")));
    let received = async {
        let mut file = tokio::fs::File::create(&upload).await?;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            file.write_all(&chunk.map_err(std::io::Error::other)?)
                .await?;
        }
        file.flush().await
    }
    .await;
    if let Err(e) = received {
        let _ = tokio::fs::remove_file(&upload).await;
        return Err(ApiError::BadRequest(format!(
            "reading the upload failed: {e}"
        )));
    }
    let vms = app.vms.clone();
    let path = upload.clone();
    let imported = tokio::task::spawn_blocking(move || vms.images.import(&q.name, &path)).await;
    let _ = tokio::fs::remove_file(&upload).await;
    let image = imported
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("the import task failed: {e}")))?
        .map_err(image_error)?;
    Ok((StatusCode::CREATED, Json(describe(&image))))
}

#[utoipa::path(delete, path = "/images/{name}", operation_id = "deleteImage", tag = "images",
    responses((status = 204), (status = 404), (status = 409, description = "a VM uses it")))]
pub async fn delete(State(app): App, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    let users: Vec<String> = app
        .vms
        .store
        .list_vms()
        .await?
        .into_iter()
        .filter(|r| r.vm.image == name)
        .map(|r| r.vm.id)
        .collect();
    if !users.is_empty() {
        return Err(ApiError::conflict(format!(
            "image '{name}' is used by {}; delete those VMs first",
            users.join(", ")
        )));
    }
    app.vms.images.delete(&name).map_err(image_error)?;
    Ok(StatusCode::NO_CONTENT)
}
