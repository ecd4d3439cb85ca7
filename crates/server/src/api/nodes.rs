use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::App;
use crate::error::ApiError;

#[utoipa::path(get, path = "/nodes", operation_id = "listNodes", tag = "nodes",
    responses((status = 200, description = "{\"nodes\": [Node]}")))]
pub async fn list(State(app): App) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "nodes": app.vms.nodes().await? })))
}
