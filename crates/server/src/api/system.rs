use axum::Json;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use serde_json::json;
use utoipa::OpenApi;

use super::{ApiDoc, App};
use crate::error::ApiError;

/// Liveness; needs no key.
pub async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

pub async fn metrics(State(app): App) -> impl IntoResponse {
    let body = app.metrics.render(app.vms.states());
    (
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

pub async fn openapi() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such API endpoint".into())
}
