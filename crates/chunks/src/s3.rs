//! Connecting to S3-compatible storage (AWS S3, Garage, MinIO, R2, Ceph RGW).

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::{ObjectStore, RetryConfig};

use crate::ChunkError;

/// Where and how to reach the bucket.
#[derive(Clone)]
pub struct S3Settings {
    /// Empty for AWS; e.g. `http://127.0.0.1:3900` for a local Garage.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// An object store for the bucket: path-style requests (custom endpoints need
/// them), plain HTTP allowed for local servers, and bounded retries so that an
/// outage surfaces as an error in seconds rather than minutes.
pub fn connect(s: &S3Settings) -> Result<Arc<dyn ObjectStore>, ChunkError> {
    let retry = RetryConfig {
        max_retries: 3,
        retry_timeout: Duration::from_secs(15),
        ..RetryConfig::default()
    };
    let mut b = AmazonS3Builder::new()
        .with_bucket_name(&s.bucket)
        .with_region(&s.region)
        .with_access_key_id(&s.access_key_id)
        .with_secret_access_key(&s.secret_access_key)
        .with_virtual_hosted_style_request(false)
        .with_retry(retry);
    if !s.endpoint.is_empty() {
        b = b
            .with_endpoint(&s.endpoint)
            .with_allow_http(s.endpoint.starts_with("http://"));
    }
    let store = b.build().map_err(|e| ChunkError::Config(e.to_string()))?;
    Ok(Arc::new(store))
}
