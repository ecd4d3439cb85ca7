use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use serde_json::{Value, json};

use super::App;
use crate::cluster::drain::DrainReport;
use crate::error::ApiError;

#[utoipa::path(get, path = "/nodes", operation_id = "listNodes", tag = "nodes",
    responses((status = 200, description = "{\"nodes\": [Node]}")))]
pub async fn list(State(app): App) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "nodes": app.vms.nodes().await? })))
}

#[utoipa::path(post, path = "/nodes/{name}/drain", operation_id = "drainNode", tag = "nodes",
    responses((status = 200, body = DrainReport, description = "the node is draining; what moved and what stayed"), (status = 404)))]
pub async fn drain(
    State(app): App,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<DrainReport>, ApiError> {
    let auth = headers.get(header::AUTHORIZATION).cloned();
    Ok(Json(app.vms.drain_node(&name, auth).await?))
}

#[utoipa::path(post, path = "/nodes/{name}/undrain", operation_id = "undrainNode", tag = "nodes",
    responses((status = 204, description = "the node takes VMs again"), (status = 404)))]
pub async fn undrain(State(app): App, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    app.vms.set_draining(&name, false).await?;
    Ok(StatusCode::NO_CONTENT)
}
