use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiJson, App};
use crate::error::ApiError;
use crate::model::{CreateVm, Vm};

#[utoipa::path(post, path = "/vms", request_body = CreateVm,
    responses((status = 201, body = Vm, description = "created; booting"),
        (status = 409, description = "name taken"), (status = 422, description = "invalid input")))]
pub async fn create(
    State(app): App,
    ApiJson(req): ApiJson<CreateVm>,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.vms.create(req).await?)))
}

#[utoipa::path(get, path = "/vms", responses((status = 200, description = "{\"vms\": [Vm]}")))]
pub async fn list(State(app): App) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "vms": app.vms.list()? })))
}

#[utoipa::path(get, path = "/vms/{id}", responses((status = 200, body = Vm), (status = 404)))]
pub async fn get(State(app): App, Path(id): Path<String>) -> Result<Json<Vm>, ApiError> {
    Ok(Json(app.vms.get(&id)?))
}

#[utoipa::path(delete, path = "/vms/{id}", responses((status = 204), (status = 404), (status = 409)))]
pub async fn delete(State(app): App, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    app.vms.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/vms/{id}/start", responses((status = 202, body = Vm), (status = 404), (status = 409)))]
pub async fn start(
    State(app): App,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    Ok((StatusCode::ACCEPTED, Json(app.vms.start(&id)?)))
}

#[utoipa::path(post, path = "/vms/{id}/stop", responses((status = 202, body = Vm), (status = 404), (status = 409)))]
pub async fn stop(
    State(app): App,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    Ok((StatusCode::ACCEPTED, Json(app.vms.stop(&id)?)))
}

#[derive(Deserialize)]
pub struct LogsQuery {
    #[serde(default)]
    offset: u64,
}

/// The serial console from `offset`; `X-Next-Offset` tells where to continue.
#[utoipa::path(get, path = "/vms/{id}/logs", params(("offset" = Option<u64>, Query)),
    responses((status = 200, content_type = "text/plain"), (status = 404)))]
pub async fn logs(
    State(app): App,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    let (bytes, next) = app.vms.logs(&id, q.offset)?;
    Ok((
        [
            (CONTENT_TYPE, "text/plain; charset=utf-8".to_string()),
            (
                "x-next-offset".parse().expect("static header name"),
                next.to_string(),
            ),
        ],
        bytes,
    )
        .into_response())
}

/// Snapshots need S3 storage, which this milestone does not configure yet.
async fn needs_storage(app: App, id: String) -> Result<Response, ApiError> {
    app.0.vms.get(&id)?;
    Err(ApiError::SnapshotStorageUnavailable)
}

pub async fn snapshot(app: App, Path(id): Path<String>) -> Result<Response, ApiError> {
    needs_storage(app, id).await
}
pub async fn restore(app: App, Path(id): Path<String>) -> Result<Response, ApiError> {
    needs_storage(app, id).await
}
pub async fn snapshots(app: App, Path(id): Path<String>) -> Result<Response, ApiError> {
    needs_storage(app, id).await
}
pub async fn retention(app: App, Path(id): Path<String>) -> Result<Response, ApiError> {
    needs_storage(app, id).await
}
pub async fn snapshot_item(
    app: App,
    Path((id, _sid)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    needs_storage(app, id).await
}
