//! API errors, and the one place where they become HTTP responses.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// The body of every error answer (for the OpenAPI document).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ErrorDetail {
    /// snake_case: bad_request, invalid, unauthorized, not_found, conflict,
    /// snapshot_storage_unavailable, state_store_unavailable, internal, ...
    code: String,
    /// For people.
    message: String,
}

/// An error the API reports to its caller.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed request (bad JSON, bad path).
    #[error("{0}")]
    BadRequest(String),
    /// Well-formed but invalid values.
    #[error("{0}")]
    Invalid(String),
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("snapshot storage is unavailable: no S3 storage is configured")]
    SnapshotStorageUnavailable,
    /// The database (PostgreSQL) cannot be reached now: nothing changed;
    /// the call can be repeated once it is back.
    #[error("the state database is unreachable; nothing was changed, try again")]
    StateStoreUnavailable,
    /// The VM belongs to a node that is down (its VMs are taken over
    /// once the cluster notices; see docs/CLUSTER.md).
    #[error("the vm's node '{0}' is down")]
    NodeDown(String),
    /// The VM's node could not be reached to carry out the call.
    #[error("the vm's node '{0}' could not be reached; nothing was changed here")]
    NodeUnreachable(String),
    #[error("{0}")]
    NotImplemented(String),
    /// The VM cannot be reached now (a wake failed or timed out); the
    /// code says why.
    #[error("{1}")]
    Unavailable(&'static str, String),
    #[error("internal error: {0:#}")]
    Internal(anyhow::Error),
}

impl ApiError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        ApiError::Invalid(msg.into())
    }
    pub fn not_found(kind: &str, id: &str) -> Self {
        ApiError::NotFound(format!("{kind} '{id}' not found"))
    }
    pub fn conflict(msg: impl Into<String>) -> Self {
        ApiError::Conflict(msg.into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::SnapshotStorageUnavailable
            | ApiError::StateStoreUnavailable
            | ApiError::NodeDown(_)
            | ApiError::Unavailable(..) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NodeUnreachable(_) => StatusCode::BAD_GATEWAY,
            ApiError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Invalid(_) => "invalid_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::SnapshotStorageUnavailable => "snapshot_storage_unavailable",
            ApiError::StateStoreUnavailable => "state_store_unavailable",
            ApiError::NodeDown(_) => "node_down",
            ApiError::NodeUnreachable(_) => "node_unreachable",
            ApiError::NotImplemented(_) => "not_implemented",
            ApiError::Unavailable(code, _) => code,
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError::Internal(e)
    }
}

impl From<crate::model::Invalid> for ApiError {
    fn from(e: crate::model::Invalid) -> Self {
        ApiError::Invalid(e.0)
    }
}

impl From<crate::supervisor::Busy> for ApiError {
    fn from(e: crate::supervisor::Busy) -> Self {
        ApiError::conflict(e.to_string())
    }
}

impl From<crate::state::StoreError> for ApiError {
    fn from(e: crate::state::StoreError) -> Self {
        if let crate::state::StoreError::NotOwner(id) = &e {
            return ApiError::conflict(format!(
                "vm '{id}' was taken over by another node; this node no longer runs it"
            ));
        }
        if e.is_unreachable() {
            tracing::warn!(error = %anyhow::Error::from(e), "state store unreachable");
            return ApiError::StateStoreUnavailable;
        }
        ApiError::Internal(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(e) = &self {
            tracing::error!(error = format!("{e:#}"), "internal error");
        }
        let body = json!({ "error": { "code": self.code(), "message": self.to_string() } });
        let mut resp = (self.status(), Json(body)).into_response();
        if matches!(self, ApiError::Unauthorized) {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}
