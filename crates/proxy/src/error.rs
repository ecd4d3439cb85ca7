//! Errors the proxy answers itself, rendered as the API's JSON error shape.

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};

use crate::body::ProxyBody;
use crate::metrics::Outcome;

/// A request the proxy could not forward.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("request has no Host header")]
    MissingHost,
    #[error("invalid Host header")]
    InvalidHost,
    #[error("the proxy does not support CONNECT")]
    ConnectNotSupported,
    #[error("no route for host '{0}'")]
    UnknownHost(String),
    #[error("VM '{vm_id}' is not running (state: {state})")]
    NotRunning { vm_id: String, state: String },
    #[error("VM '{vm_id}' is unavailable: {message}")]
    Unavailable {
        vm_id: String,
        code: &'static str,
        message: String,
        retry_after_secs: u64,
    },
    #[error("could not connect to VM '{vm_id}'")]
    BackendConnect { vm_id: String },
    #[error("VM '{vm_id}' closed the connection or sent an invalid response")]
    BackendFailed { vm_id: String },
    #[error(
        "VM '{vm_id}' answered 101 Switching Protocols to a request that did not ask to upgrade"
    )]
    UnexpectedUpgrade { vm_id: String },
    #[error("{0}")]
    Forbidden(String),
    #[error("internal proxy error: {0}")]
    Internal(String),
}

impl ProxyError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::MissingHost | Self::InvalidHost => StatusCode::BAD_REQUEST,
            Self::ConnectNotSupported => StatusCode::METHOD_NOT_ALLOWED,
            Self::UnknownHost(_) => StatusCode::NOT_FOUND,
            Self::NotRunning { .. } | Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::BackendConnect { .. }
            | Self::BackendFailed { .. }
            | Self::UnexpectedUpgrade { .. } => StatusCode::BAD_GATEWAY,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub(crate) fn code(&self) -> &'static str {
        match self {
            Self::MissingHost | Self::InvalidHost => "bad_request",
            Self::ConnectNotSupported => "method_not_allowed",
            Self::UnknownHost(_) => "not_found",
            Self::NotRunning { .. } => "vm_not_running",
            Self::Unavailable { code, .. } => code,
            Self::BackendConnect { .. }
            | Self::BackendFailed { .. }
            | Self::UnexpectedUpgrade { .. } => "bad_gateway",
            Self::Forbidden(_) => "forbidden",
            Self::Internal(_) => "internal",
        }
    }

    pub(crate) fn outcome(&self) -> Outcome {
        match self {
            Self::MissingHost | Self::InvalidHost | Self::ConnectNotSupported => {
                Outcome::BadRequest
            }
            Self::UnknownHost(_) => Outcome::UnknownHost,
            Self::NotRunning { .. } | Self::Unavailable { .. } => Outcome::NotRunning,
            Self::BackendConnect { .. }
            | Self::BackendFailed { .. }
            | Self::UnexpectedUpgrade { .. } => Outcome::BadGateway,
            Self::Forbidden(_) => Outcome::BadRequest,
            Self::Internal(_) => Outcome::Internal,
        }
    }

    /// The JSON body `{"error": {"code": ..., "message": ...}}`.
    pub(crate) fn json_body(&self) -> String {
        serde_json::json!({
            "error": {
                "code": self.code(),
                "message": self.to_string(),
            }
        })
        .to_string()
    }

    pub(crate) fn into_response(self) -> Response<ProxyBody> {
        let mut response = Response::new(ProxyBody::full(Bytes::from(self.json_body())));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Self::Unavailable {
            retry_after_secs, ..
        } = &self
        {
            headers.insert(
                http::header::RETRY_AFTER,
                HeaderValue::from(*retry_after_secs),
            );
        }
        if matches!(self, Self::ConnectNotSupported) {
            headers.insert(
                http::header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE"),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape_and_escaping() {
        let err = ProxyError::UnknownHost("we\"ird".to_owned());
        let value: serde_json::Value = serde_json::from_str(&err.json_body()).unwrap();
        assert_eq!(value["error"]["code"], "not_found");
        assert_eq!(value["error"]["message"], "no route for host 'we\"ird'");
        assert_eq!(err.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn not_running_names_vm_and_state() {
        let err = ProxyError::NotRunning {
            vm_id: "vm-1".to_owned(),
            state: "snapshotted".to_owned(),
        };
        let value: serde_json::Value = serde_json::from_str(&err.json_body()).unwrap();
        assert_eq!(value["error"]["code"], "vm_not_running");
        let message = value["error"]["message"].as_str().unwrap();
        assert!(message.contains("vm-1") && message.contains("snapshotted"));
        assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
