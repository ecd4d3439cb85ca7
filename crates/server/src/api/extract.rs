//! A JSON body extractor whose rejections are API errors: syntax errors are
//! 400, well-formed bodies with wrong or unknown fields are 422. An empty body
//! counts as `{}`, so `POST /vms` with no body creates a default VM.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Largest accepted request body.
const MAX_BODY: usize = 64 * 1024;

pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::BadRequest(format!("cannot read request body: {e}")))?;
        if bytes.len() > MAX_BODY {
            return Err(ApiError::BadRequest(format!(
                "request body is larger than {MAX_BODY} bytes"
            )));
        }
        let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(text).map(ApiJson).map_err(|e| {
            if e.is_syntax() || e.is_eof() {
                ApiError::BadRequest(format!("request body is not valid JSON: {e}"))
            } else {
                ApiError::Invalid(format!("invalid request body: {e}"))
            }
        })
    }
}
