use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiJson, App};
use crate::error::ApiError;
use crate::model::{
    CreateSnapshot, CreateVm, EventList, MoveRequest, RestoreRequest, Retention, Snapshot, Storage,
    Vm,
};

#[utoipa::path(post, path = "/vms", operation_id = "createVm", tag = "vms", request_body = CreateVm,
    responses((status = 201, body = Vm, description = "created; booting"),
        (status = 409, description = "name taken"), (status = 422, description = "invalid input")))]
pub async fn create(
    State(app): App,
    ApiJson(req): ApiJson<CreateVm>,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.vms.create(req).await?)))
}

#[utoipa::path(get, path = "/vms", operation_id = "listVms", tag = "vms", responses((status = 200, description = "{\"vms\": [Vm]}")))]
pub async fn list(State(app): App) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "vms": app.vms.list().await? })))
}

#[utoipa::path(get, path = "/vms/{id}", operation_id = "getVm", tag = "vms", responses((status = 200, body = Vm), (status = 404)))]
pub async fn get(State(app): App, Path(id): Path<String>) -> Result<Json<Vm>, ApiError> {
    let id = app.vms.resolve(&id).await?;
    Ok(Json(app.vms.get(&id).await?))
}

#[utoipa::path(delete, path = "/vms/{id}", operation_id = "deleteVm", tag = "vms", responses((status = 204), (status = 404), (status = 409)))]
pub async fn delete(State(app): App, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let id = app.vms.resolve_local(&id).await?;
    app.vms.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/vms/{id}/start", operation_id = "startVm", tag = "vms", responses((status = 202, body = Vm), (status = 404), (status = 409)))]
pub async fn start(
    State(app): App,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    let id = app.vms.resolve_local(&id).await?;
    Ok((StatusCode::ACCEPTED, Json(app.vms.start(&id).await?)))
}

#[utoipa::path(post, path = "/vms/{id}/stop", operation_id = "stopVm", tag = "vms", responses((status = 202, body = Vm), (status = 404), (status = 409)))]
pub async fn stop(
    State(app): App,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    let id = app.vms.resolve_local(&id).await?;
    Ok((StatusCode::ACCEPTED, Json(app.vms.stop(&id).await?)))
}

#[derive(Deserialize)]
pub struct LogsQuery {
    #[serde(default)]
    offset: u64,
}

/// The serial console from `offset`; `X-Next-Offset` tells where to continue.
#[utoipa::path(get, path = "/vms/{id}/logs", operation_id = "getVmLogs", tag = "vms", params(("offset" = Option<u64>, Query)),
    responses((status = 200, content_type = "text/plain"), (status = 404)))]
pub async fn logs(
    State(app): App,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    let id = app.vms.resolve_local(&id).await?;
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

#[utoipa::path(post, path = "/vms/{id}/snapshot", operation_id = "createSnapshot", tag = "snapshots", request_body = CreateSnapshot,
    responses((status = 202, body = Snapshot), (status = 404), (status = 409),
        (status = 503, description = "no snapshot storage configured")))]
pub async fn snapshot(
    State(app): App,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<CreateSnapshot>,
) -> Result<(StatusCode, Json<Snapshot>), ApiError> {
    let id = app.vms.resolve_local(&id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(app.vms.snapshot(&id, req, "manual").await?),
    ))
}

#[utoipa::path(post, path = "/vms/{id}/restore", operation_id = "restoreVm", tag = "snapshots", request_body = RestoreRequest,
    responses((status = 202, body = Vm), (status = 404), (status = 409), (status = 503)))]
pub async fn restore(
    State(app): App,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<RestoreRequest>,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    let id = app.vms.resolve_local(&id).await?;
    Ok((StatusCode::ACCEPTED, Json(app.vms.restore(&id, req).await?)))
}

#[utoipa::path(get, path = "/vms/{id}/events", operation_id = "listVmEvents", tag = "vms",
    responses((status = 200, body = EventList, description = "wakes and idle suspends, newest first (the last 100)"), (status = 404)))]
pub async fn events(State(app): App, Path(id): Path<String>) -> Result<Json<EventList>, ApiError> {
    let id = app.vms.resolve(&id).await?;
    Ok(Json(EventList {
        events: app.vms.events(&id).await?,
    }))
}

#[utoipa::path(get, path = "/vms/{id}/snapshots", operation_id = "listSnapshots", tag = "snapshots",
    responses((status = 200, description = "{\"snapshots\": [Snapshot]}, newest first"), (status = 404), (status = 503)))]
pub async fn snapshots(State(app): App, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = app.vms.resolve(&id).await?;
    Ok(Json(
        json!({ "snapshots": app.vms.list_snapshots(&id).await? }),
    ))
}

#[utoipa::path(get, path = "/vms/{id}/snapshots/{sid}", operation_id = "getSnapshot", tag = "snapshots", responses((status = 200, body = Snapshot), (status = 404), (status = 503)))]
pub async fn get_snapshot(
    State(app): App,
    Path((id, sid)): Path<(String, String)>,
) -> Result<Json<Snapshot>, ApiError> {
    let id = app.vms.resolve(&id).await?;
    Ok(Json(app.vms.get_snapshot(&id, &sid).await?))
}

#[utoipa::path(delete, path = "/vms/{id}/snapshots/{sid}", operation_id = "deleteSnapshot", tag = "snapshots", responses((status = 204), (status = 404), (status = 409), (status = 503)))]
pub async fn delete_snapshot(
    State(app): App,
    Path((id, sid)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let id = app.vms.resolve_local(&id).await?;
    app.vms.delete_snapshot(&id, &sid).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(put, path = "/vms/{id}/retention", operation_id = "setRetention", tag = "snapshots", request_body = Retention,
    responses((status = 200, body = Retention), (status = 404), (status = 422), (status = 503)))]
pub async fn retention(
    State(app): App,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<Retention>,
) -> Result<Json<Retention>, ApiError> {
    let id = app.vms.resolve_local(&id).await?;
    Ok(Json(app.vms.set_retention(&id, req).await?))
}

#[utoipa::path(get, path = "/vms/{id}/retention", operation_id = "getRetention", tag = "snapshots", responses((status = 200, body = Retention), (status = 404), (status = 503)))]
pub async fn get_retention(
    State(app): App,
    Path(id): Path<String>,
) -> Result<Json<Retention>, ApiError> {
    let id = app.vms.resolve(&id).await?;
    Ok(Json(app.vms.retention(&id).await?))
}

#[utoipa::path(get, path = "/storage", operation_id = "getStorage", tag = "storage", responses((status = 200, body = Storage), (status = 503)))]
pub async fn storage(State(app): App) -> Result<Json<Storage>, ApiError> {
    Ok(Json(app.vms.storage_usage().await?))
}

#[utoipa::path(post, path = "/storage/gc", operation_id = "collectGarbage", tag = "storage", responses((status = 200, body = crate::snapshot::gc::GcReport), (status = 503)))]
pub async fn gc(State(app): App) -> Result<Json<crate::snapshot::gc::GcReport>, ApiError> {
    Ok(Json(app.vms.collect_garbage().await?))
}

#[utoipa::path(post, path = "/vms/{id}/move", operation_id = "moveVm", tag = "vms", request_body = MoveRequest,
    responses((status = 202, body = Vm, description = "the VM on its new node (restoring, or snapshotted with start: false)"),
        (status = 404), (status = 409, description = "the VM or the target cannot move now"), (status = 422)))]
pub async fn move_vm(
    State(app): App,
    Path(id): Path<String>,
    headers: http::HeaderMap,
    ApiJson(req): ApiJson<MoveRequest>,
) -> Result<Response, ApiError> {
    let id = app.vms.resolve_local(&id).await?;
    let vm = app.vms.move_vm(&id, &req.to).await?;
    if !req.start.unwrap_or(true) {
        return Ok((StatusCode::ACCEPTED, Json(vm)).into_response());
    }
    Ok(super::forward::call_node(
        &app,
        &id,
        http::Method::POST,
        &format!("/vms/{id}/start"),
        headers.get(http::header::AUTHORIZATION).cloned(),
    )
    .await)
}
