//! Garbage collection: delete chunks that no manifest references.
//!
//! Safe with several daemons sharing the bucket: it runs under the exclusive
//! bucket lock (`lock.rs`), so no upload is between skipping a stored chunk
//! and writing the manifest that references it. Chunks younger than a grace
//! period are kept as well (uploads by software that does not take locks).

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;

use crate::lock::EPOCH_KEY;
use crate::{ChunkError, ChunkStore};

/// What a collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub manifests: u64,
    pub chunks: u64,
    pub deleted_chunks: u64,
    pub freed_bytes: u64,
    /// Unreferenced chunks kept because they are younger than the grace period.
    pub kept_young: u64,
}

impl ChunkStore {
    /// Delete every chunk that no object under the `manifests` prefixes
    /// references. `references` reads the chunk ids out of one manifest
    /// (given its key and bytes); a manifest it
    /// cannot read may reference anything, so the collection stops. Fails
    /// with [`ChunkError::Locked`] while uploads (of any daemon) run.
    pub async fn collect_garbage(
        &self,
        owner: &str,
        manifests: &[&str],
        max_manifest_bytes: u64,
        references: impl Fn(&str, &[u8]) -> Result<Vec<String>, String>,
        grace: Duration,
    ) -> Result<GcReport, ChunkError> {
        let lock = self.lock_for_gc(owner).await?;
        let result = self
            .collect_locked(
                manifests,
                max_manifest_bytes,
                references,
                grace,
                lock.taken_at,
            )
            .await;
        lock.release().await;
        result
    }

    async fn collect_locked(
        &self,
        manifests: &[&str],
        max_manifest_bytes: u64,
        references: impl Fn(&str, &[u8]) -> Result<Vec<String>, String>,
        grace: Duration,
        now: i64,
    ) -> Result<GcReport, ChunkError> {
        let mut report = GcReport::default();
        let mut referenced = HashSet::new();
        let mut keys = Vec::new();
        for prefix in manifests {
            keys.extend(self.list(prefix).await?);
        }
        for key in keys {
            let bytes = self.get(&key, max_manifest_bytes).await?;
            let ids = references(&key, &bytes).map_err(|reason| ChunkError::Corrupt {
                id: key.clone(),
                reason: format!("garbage collection stopped: {reason}"),
            })?;
            referenced.extend(ids);
            report.manifests += 1;
        }
        // Before anything is deleted: uploads from now on forget what they
        // cached about stored chunks (see `lock.rs`).
        let epoch = format!("{:016x}", rand::random::<u64>());
        self.put(EPOCH_KEY, Bytes::from(epoch)).await?;
        let grace = grace.as_secs() as i64;
        for (id, size, modified) in self.list_chunks().await? {
            report.chunks += 1;
            if referenced.contains(&id) {
                continue;
            }
            if now - modified < grace {
                report.kept_young += 1;
                continue;
            }
            self.delete_chunk(&id).await?;
            report.deleted_chunks += 1;
            report.freed_bytes += size;
        }
        Ok(report)
    }

    /// Stored chunks: (id, size, last modified as unix seconds by the
    /// store's clock).
    async fn list_chunks(&self) -> Result<Vec<(String, u64, i64)>, ChunkError> {
        Ok(self
            .list_meta("chunks/")
            .await?
            .into_iter()
            .filter_map(|m| {
                let id = m.location.filename()?.to_string();
                Some((id, m.size, m.last_modified.timestamp()))
            })
            .collect())
    }
}
