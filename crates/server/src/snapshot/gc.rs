//! Garbage collection of chunks that no manifest references.
//!
//! Safe against concurrent uploads in this daemon: uploads hold the GC lock
//! shared, collection holds it exclusively, so a chunk an upload found
//! present (and did not re-upload) cannot vanish before its manifest is
//! written. Chunks younger than the grace period are kept as well, which
//! covers uploads by another daemon sharing the bucket that have not written
//! their manifest yet (for at most that long).

use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use utoipa::ToSchema;

use super::manifest::Manifest;
use crate::error::ApiError;
use crate::manager::VmManager;

/// What a collection did.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct GcReport {
    pub manifests: u64,
    pub chunks: u64,
    pub deleted_chunks: u64,
    pub freed_bytes: u64,
}

impl VmManager {
    pub async fn collect_garbage(&self) -> Result<GcReport, ApiError> {
        let store = self.storage()?;
        let _exclusive = self.gc_lock.write().await;
        let internal = |e: hatch_chunks::ChunkError| ApiError::Internal(e.into());
        let mut report = GcReport::default();
        let mut referenced = HashSet::new();
        for key in store.list("manifests/").await.map_err(internal)? {
            let bytes = store.get(&key).await.map_err(internal)?;
            // A manifest we cannot read may reference anything: stop.
            let m = Manifest::decode(&bytes).map_err(|e| {
                ApiError::Internal(anyhow::anyhow!("garbage collection stopped: {key}: {e}"))
            })?;
            report.manifests += 1;
            let files = [&m.device_state, &m.memory]
                .into_iter()
                .chain(m.disk_layers.iter().map(|l| &l.chunks));
            for f in files {
                referenced.extend(f.ids().map(String::from));
            }
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(i64::MAX);
        let grace = self.cfg.gc_grace.as_secs() as i64;
        for (id, size, modified) in store.list_chunks().await.map_err(internal)? {
            report.chunks += 1;
            if referenced.contains(&id) || now - modified < grace {
                continue;
            }
            store.delete_chunk(&id).await.map_err(internal)?;
            report.deleted_chunks += 1;
            report.freed_bytes += size;
        }
        tracing::info!(
            manifests = report.manifests,
            chunks = report.chunks,
            deleted = report.deleted_chunks,
            freed_bytes = report.freed_bytes,
            "garbage collection"
        );
        Ok(report)
    }
}
