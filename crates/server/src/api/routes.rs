use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::{ApiJson, App};
use crate::error::ApiError;
use crate::model::{CreateRoute, Route};

#[utoipa::path(post, path = "/routes", operation_id = "createRoute", tag = "routes", request_body = CreateRoute,
    responses((status = 201, body = Route), (status = 404, description = "unknown vm"),
        (status = 409, description = "hostname taken"), (status = 422, description = "invalid input")))]
pub async fn create(
    State(app): App,
    ApiJson(req): ApiJson<CreateRoute>,
) -> Result<(StatusCode, Json<Route>), ApiError> {
    Ok((StatusCode::CREATED, Json(app.vms.create_route(req).await?)))
}

#[utoipa::path(get, path = "/routes", operation_id = "listRoutes", tag = "routes", responses((status = 200, description = "{\"routes\": [Route]}")))]
pub async fn list(State(app): App) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "routes": app.vms.list_routes().await? })))
}

#[utoipa::path(get, path = "/routes/{id}", operation_id = "getRoute", tag = "routes", responses((status = 200, body = Route), (status = 404)))]
pub async fn get(State(app): App, Path(id): Path<String>) -> Result<Json<Route>, ApiError> {
    Ok(Json(app.vms.get_route(&id).await?))
}

#[utoipa::path(delete, path = "/routes/{id}", operation_id = "deleteRoute", tag = "routes", responses((status = 204), (status = 404)))]
pub async fn delete(State(app): App, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    app.vms.delete_route(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
