//! Images: list, import a container image archive, delete.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use super::App;
use crate::error::ApiError;
use crate::images::{describe, image_error};

#[utoipa::path(get, path = "/images", operation_id = "listImages", tag = "images",
    responses((status = 200, description = "{\"images\": [{name, kind, disk_mib, created_at, app?, node, stored, on_this_node}]}: the cluster's imported images and this node's own")))]
pub async fn list(State(app): App) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "images": app.vms.list_images().await? })))
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
    if app.vms.store.get_image(&q.name).await?.is_some() {
        return Err(ApiError::conflict(format!(
            "image '{}' already exists",
            q.name
        )));
    }
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
    let imported = app.vms.import_image(&q.name, &upload).await;
    let _ = tokio::fs::remove_file(&upload).await;
    Ok((StatusCode::CREATED, Json(describe(&imported?))))
}

#[utoipa::path(delete, path = "/images/{name}", operation_id = "deleteImage", tag = "images",
    responses((status = 204), (status = 404), (status = 409, description = "a VM (of any node) uses it")))]
pub async fn delete(State(app): App, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    app.vms.delete_image(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
