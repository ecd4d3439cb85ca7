//! Garbage collection of chunks that no manifest references: the protocol
//! (bucket locks shared with every daemon's uploads) lives in
//! `hatch_chunks`; this names what to keep: the chunks of snapshot
//! manifests (`manifests/`) and image manifests (`images/`). Manifests are read without
//! authenticating them: any manifest, even one sealed with a key this
//! daemon does not hold, keeps its chunks.

use serde::Serialize;
use utoipa::ToSchema;

use hatch_snapshot::image_manifest::{
    IMAGE_MANIFESTS_PREFIX, ImageManifest, MAX_IMAGE_MANIFEST_BYTES,
};

use super::manifest::{MAX_MANIFEST_BYTES, Manifest};
use crate::error::ApiError;
use crate::manager::VmManager;

/// What a collection did.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct GcReport {
    pub manifests: u64,
    pub chunks: u64,
    pub deleted_chunks: u64,
    pub freed_bytes: u64,
    /// Unreferenced chunks kept because they are younger than the grace
    /// period (`HATCH_GC_GRACE_SECONDS`).
    pub kept_young: u64,
    /// Chunks that manifests reference (kept).
    pub kept_referenced: u64,
    /// The grace period: an unreferenced chunk younger than this may belong
    /// to an upload in progress (of any daemon sharing the bucket).
    pub grace_seconds: u64,
}

impl VmManager {
    pub async fn collect_garbage(&self) -> Result<GcReport, ApiError> {
        let store = self.storage()?;
        // Exclusive with this daemon's uploads; the bucket lock taken by
        // the chunk store excludes every other daemon's.
        let _exclusive = self.gc_lock.write().await;
        let r = store
            .collect_garbage(
                &self.owner,
                &["manifests/", IMAGE_MANIFESTS_PREFIX],
                MAX_MANIFEST_BYTES.max(MAX_IMAGE_MANIFEST_BYTES),
                |key, bytes| {
                    if key.starts_with(IMAGE_MANIFESTS_PREFIX) {
                        ImageManifest::chunk_refs(bytes)
                    } else {
                        Manifest::chunk_refs(bytes)
                    }
                },
                self.cfg.gc_grace,
            )
            .await
            .map_err(|e| match e {
                hatch_chunks::ChunkError::Locked(holder) => ApiError::conflict(format!(
                    "garbage collection did not run: the bucket is in use ({holder}); try again when uploads are done"
                )),
                other => ApiError::Internal(anyhow::Error::new(other).context("garbage collection")),
            })?;
        tracing::info!(
            manifests = r.manifests,
            chunks = r.chunks,
            deleted = r.deleted_chunks,
            freed_bytes = r.freed_bytes,
            kept_young = r.kept_young,
            "garbage collection"
        );
        Ok(GcReport {
            manifests: r.manifests,
            chunks: r.chunks,
            deleted_chunks: r.deleted_chunks,
            freed_bytes: r.freed_bytes,
            kept_young: r.kept_young,
            kept_referenced: r
                .chunks
                .saturating_sub(r.deleted_chunks)
                .saturating_sub(r.kept_young),
            grace_seconds: self.cfg.gc_grace.as_secs(),
        })
    }
}
