//! The HTTP API: a thin layer that decodes requests, calls the core
//! ([`VmManager`]) and encodes answers. Errors become HTTP in `error.rs` only.

mod exec;
mod extract;
mod forward;
mod images;
mod keys;
mod nodes;
mod openapi;
mod routes;
mod system;
mod vms;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post, put};

use crate::auth::{KeyRing, bearer_token};
use crate::error::ApiError;
use crate::manager::VmManager;
use crate::metrics::Metrics;

pub use extract::ApiJson;
pub use openapi::ApiDoc;

/// What every handler can reach.
pub struct AppState {
    pub vms: Arc<VmManager>,
    pub keys: KeyRing,
    pub metrics: Arc<Metrics>,
}

pub type App = State<Arc<AppState>>;

pub fn router(state: Arc<AppState>) -> Router {
    let authed = Router::new()
        .route("/vms", post(vms::create).get(vms::list))
        .route("/vms/{id}", get(vms::get).delete(vms::delete))
        .route("/vms/{id}/start", post(vms::start))
        .route("/vms/{id}/stop", post(vms::stop))
        .route("/vms/{id}/logs", get(vms::logs))
        .route("/vms/{id}/exec", post(exec::exec))
        .route("/vms/{id}/exec/ws", get(exec::exec_ws))
        .route(
            "/vms/{id}/files",
            get(exec::read_file)
                .put(exec::write_file)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/vms/{id}/snapshot", post(vms::snapshot))
        .route("/vms/{id}/restore", post(vms::restore))
        .route("/vms/{id}/move", post(vms::move_vm))
        .route("/vms/{id}/snapshots", get(vms::snapshots))
        .route("/vms/{id}/events", get(vms::events))
        .route(
            "/vms/{id}/snapshots/{sid}",
            get(vms::get_snapshot).delete(vms::delete_snapshot),
        )
        .route(
            "/vms/{id}/retention",
            put(vms::retention).get(vms::get_retention),
        )
        .route("/storage", get(vms::storage))
        .route("/storage/gc", post(vms::gc))
        .route("/routes", post(routes::create).get(routes::list))
        .route("/routes/{id}", get(routes::get).delete(routes::delete))
        .route("/keys", get(keys::list).post(keys::create))
        .route("/keys/{id}", axum::routing::delete(keys::revoke))
        .route(
            "/images",
            post(images::import)
                .get(images::list)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/images/{name}", axum::routing::delete(images::delete))
        .route("/nodes", get(nodes::list))
        .route("/nodes/{name}/drain", post(nodes::drain))
        .route("/nodes/{name}/undrain", post(nodes::undrain))
        .route("/metrics", get(system::metrics))
        .route("/openapi.json", get(system::openapi))
        // Layers run last-added first: the key is checked, then calls on
        // another node's VM go there.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            forward::to_owner,
        ))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/healthz", get(system::healthz))
        .merge(authed)
        .fallback(system::not_found)
        .with_state(state)
}

async fn require_key(State(app): App, req: Request, next: Next) -> Result<Response, ApiError> {
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    match presented {
        Some(key) if app.keys.verify(key) => Ok(next.run(req).await),
        _ => Err(ApiError::Unauthorized),
    }
}
