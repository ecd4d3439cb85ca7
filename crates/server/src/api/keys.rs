use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::{ApiJson, App};
use crate::error::ApiError;
use crate::model::{CreateApiKey, CreatedApiKey};

#[utoipa::path(get, path = "/keys", operation_id = "listKeys", tag = "keys", responses((status = 200, description = "{\"keys\": [ApiKey]} (never the keys themselves)")))]
pub async fn list(State(app): App) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "keys": app.keys.list().await? })))
}

#[utoipa::path(post, path = "/keys", operation_id = "createKey", tag = "keys", request_body = CreateApiKey,
    responses((status = 201, body = CreatedApiKey, description = "the key is in this answer only"),
        (status = 422, description = "invalid name")))]
pub async fn create(
    State(app): App,
    ApiJson(req): ApiJson<CreateApiKey>,
) -> Result<(StatusCode, Json<CreatedApiKey>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.keys.create(req.name).await?)))
}

/// Revoke a key (by id or name); it is refused at once. The last key
/// cannot be revoked.
#[utoipa::path(delete, path = "/keys/{id}", operation_id = "revokeKey", tag = "keys", responses((status = 204), (status = 404), (status = 409)))]
pub async fn revoke(State(app): App, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    app.keys.revoke(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
