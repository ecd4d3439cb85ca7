//! The storage worker. Captured snapshots (`uploading`, with a local copy)
//! are uploaded in the background; a failed attempt is retried with
//! exponential backoff (1 s doubling, up to `upload_retry_max`) until S3
//! holds the snapshot or it is deleted, so a VM suspended during an S3
//! outage becomes `ready` on its own once S3 is back. Manifest deletions
//! that failed are retried the same way, so no orphan manifest pins chunks
//! forever. The database is the queue: the worker survives restarts.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hatch_chunks::ChunkStore;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::manifest::manifest_key;
use crate::manager::{VmManager, now_rfc3339};
use crate::model::{SnapshotStatus, UploadStatus};
use crate::state::SnapshotRecord;

/// Snapshots uploaded at once (each moves 16 chunks at a time).
const MAX_PARALLEL: usize = 2;
/// First pause after a failed attempt; it doubles with every failure.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// How often failed manifest deletions are tried again.
const DELETE_RETRY_EVERY: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct Uploads {
    kick: Notify,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    running: HashMap<String, Running>,
    /// Snapshots being deleted: never started again, even by a scan of the
    /// queue that read them just before their deletion.
    cancelled: HashSet<String>,
    retry_at: HashMap<String, Instant>,
    retries: u64,
    last_error: Option<(String, String)>,
    deletes_tried: Option<Instant>,
}

struct Running {
    cancel: CancellationToken,
    done: watch::Receiver<bool>,
}

/// The pause before attempt `failures + 1`.
pub fn backoff(failures: u32, max: Duration) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(20);
    (FIRST_RETRY * factor).min(max)
}

impl Uploads {
    /// New work is waiting (a capture finished, a snapshot was recovered).
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self, queued: u64) -> UploadStatus {
        let s = self.lock();
        UploadStatus {
            queued,
            in_progress: s.running.len() as u64,
            retries: s.retries,
            last_error: s.last_error.as_ref().map(|(_, e)| e.clone()),
            last_error_at: s.last_error.as_ref().map(|(t, _)| t.clone()),
        }
    }
}

/// Ends an upload's entry however its task ends.
struct Finished<'a> {
    uploads: &'a Uploads,
    id: String,
    done: watch::Sender<bool>,
}

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.uploads.lock().running.remove(&self.id);
        let _ = self.done.send(true);
        self.uploads.kick();
    }
}

impl VmManager {
    pub async fn storage_worker(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(store) = self.storage.clone() else {
            return;
        };
        loop {
            self.start_due_uploads(&store).await;
            self.retry_pending_deletes(&store).await;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.uploads.kick.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn start_due_uploads(self: &Arc<Self>, store: &Arc<ChunkStore>) {
        let waiting = match self
            .store
            .snapshots_with_status(SnapshotStatus::Uploading)
            .await
        {
            // Other nodes upload their own snapshots.
            Ok(mut w) => {
                w.retain(|r| self.runs_here(&r.snap.vm_id));
                w
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the upload queue");
                return;
            }
        };
        self.metrics.upload_queue.set(waiting.len() as i64);
        let now = Instant::now();
        {
            // A cancelled snapshot no longer in the queue is gone for good.
            let queued: HashSet<&str> = waiting.iter().map(|r| r.snap.id.as_str()).collect();
            self.uploads
                .lock()
                .cancelled
                .retain(|id| queued.contains(id.as_str()));
        }
        for mut rec in waiting {
            let id = rec.snap.id.clone();
            let blocked = |s: &State| {
                s.running.contains_key(&id)
                    || s.cancelled.contains(&id)
                    || s.running.len() >= MAX_PARALLEL
                    || s.retry_at.get(&id).is_some_and(|at| *at > now)
            };
            if blocked(&self.uploads.lock()) {
                continue;
            }
            if !rec.local {
                rec.snap.status = SnapshotStatus::Failed;
                rec.snap.error = Some("its local copy is gone and S3 does not hold it".to_string());
                self.save_record(&rec).await;
                continue;
            }
            let (done_tx, done_rx) = watch::channel(false);
            let cancel = CancellationToken::new();
            {
                // Checked again and registered under one lock: a
                // cancellation either sees it running or marks it cancelled first.
                let mut s = self.uploads.lock();
                if blocked(&s) {
                    continue;
                }
                s.running.insert(
                    id.clone(),
                    Running {
                        cancel: cancel.clone(),
                        done: done_rx,
                    },
                );
            }
            let (this, store) = (self.clone(), store.clone());
            self.tasks.spawn(async move {
                let _finished = Finished {
                    uploads: &this.uploads,
                    id,
                    done: done_tx,
                };
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = this.upload_once(rec, &store) => {}
                }
            });
        }
    }

    /// One attempt; records success, or the failure and when to retry.
    async fn upload_once(self: &Arc<Self>, mut rec: SnapshotRecord, store: &ChunkStore) {
        let Ok(vm) = self.get(&rec.snap.vm_id).await else {
            return;
        };
        let started = Instant::now();
        match self.upload(&rec, store, &vm).await {
            Ok(stored) => {
                rec.snap.stored_bytes = stored;
                self.metrics.record_vm_stored(&vm.id, stored);
                rec.snap.status = SnapshotStatus::Ready;
                rec.snap.error = None;
                self.uploads.lock().retry_at.remove(&rec.snap.id);
                self.metrics.record_upload("ok");
                if let Err(e) = self.apply_retention(&vm.id, Some(&rec)).await {
                    tracing::warn!(vm = %vm.id, error = %e, "retention failed");
                }
                self.save_record(&rec).await;
                tracing::info!(vm = %vm.id, snapshot = %rec.snap.id, stored_bytes = stored,
                    upload_ms = started.elapsed().as_millis() as u64, "snapshot ready");
                // A suspended VM's next wake takes this image as it is.
                self.stand_by_soon(&vm.id, &rec.snap.id);
                self.enforce_local_budget_soon().await;
            }
            Err(e) if e.downcast_ref::<super::SnapshotCorrupt>().is_some() => {
                // Retrying cannot help: the copy is not what was captured.
                // It is kept as it is for a person to look at.
                rec.snap.status = SnapshotStatus::Failed;
                rec.snap.error = Some(format!("upload refused: {e:#}"));
                self.metrics.record_upload("failed");
                self.save_record(&rec).await;
                tracing::error!(vm = %vm.id, snapshot = %rec.snap.id, error = format!("{e:#}"), "upload refused");
            }
            Err(e) => {
                rec.upload_attempts += 1;
                let wait = backoff(rec.upload_attempts, self.cfg.upload_retry_max);
                let error = format!("{e:#}");
                rec.snap.error = Some(format!(
                    "upload attempt {} failed: {error}; retrying in {} s; the local copy stays restorable",
                    rec.upload_attempts,
                    wait.as_secs()
                ));
                {
                    let mut s = self.uploads.lock();
                    s.retry_at
                        .insert(rec.snap.id.clone(), Instant::now() + wait);
                    s.retries += 1;
                    s.last_error = Some((now_rfc3339(), format!("{}: {error}", rec.snap.id)));
                }
                self.metrics.record_upload("failed");
                self.save_record(&rec).await;
                tracing::warn!(vm = %vm.id, snapshot = %rec.snap.id, attempt = rec.upload_attempts,
                    retry_in_s = wait.as_secs(), error, "upload failed");
            }
        }
    }

    /// Stop the uploads of these snapshots and wait until they have
    /// stopped: afterwards no manifest of theirs will be written.
    pub(crate) async fn cancel_uploads(&self, snapshot_ids: &[String]) {
        let waits: Vec<_> = {
            let mut s = self.uploads.lock();
            s.cancelled.extend(snapshot_ids.iter().cloned());
            snapshot_ids
                .iter()
                .filter_map(|id| s.running.get(id))
                .map(|r| {
                    r.cancel.cancel();
                    r.done.clone()
                })
                .collect()
        };
        for mut done in waits {
            let _ = done.wait_for(|d| *d).await;
        }
        let mut s = self.uploads.lock();
        for id in snapshot_ids {
            s.retry_at.remove(id);
        }
    }

    /// Delete a snapshot's manifest from S3 (its deletion was queued with
    /// the record's); if that fails, the storage worker retries it.
    pub(crate) async fn delete_manifest(&self, store: &ChunkStore, vm_id: &str, snapshot_id: &str) {
        self.delete_object(store, &manifest_key(vm_id, snapshot_id))
            .await;
    }

    /// Delete an object whose deletion was queued with a record's (a
    /// manifest); if that fails, the storage worker retries it.
    pub(crate) async fn delete_object(&self, store: &ChunkStore, key: &str) {
        let key = key.to_string();
        let outcome = match store.delete(&key).await {
            Ok(()) => self.store.remove_pending_delete(&key).await,
            Err(e) => {
                tracing::warn!(key, error = %e, "manifest deletion failed; it will be retried");
                self.store
                    .add_pending_delete(&key, &format!("{e:#}"), &now_rfc3339())
                    .await
            }
        };
        if let Err(e) = outcome {
            tracing::error!(key, error = %e, "cannot record the manifest deletion");
        }
    }

    async fn retry_pending_deletes(&self, store: &ChunkStore) {
        {
            let mut s = self.uploads.lock();
            if s.deletes_tried
                .is_some_and(|t| t.elapsed() < DELETE_RETRY_EVERY)
            {
                return;
            }
            s.deletes_tried = Some(Instant::now());
        }
        let Ok(pending) = self.store.pending_deletes().await else {
            return;
        };
        self.metrics.pending_deletes.set(pending.len() as i64);
        for (key, _) in pending {
            let outcome = match store.delete(&key).await {
                Ok(()) => self.store.remove_pending_delete(&key).await,
                Err(e) => {
                    self.store
                        .add_pending_delete(&key, &format!("{e:#}"), &now_rfc3339())
                        .await
                }
            };
            if let Err(e) = outcome {
                tracing::warn!(key, error = %e, "recording a manifest deletion failed");
            }
        }
    }

    /// For `GET /storage`.
    pub(crate) async fn upload_status(&self) -> UploadStatus {
        let queued = self
            .store
            .snapshots_with_status(SnapshotStatus::Uploading)
            .await
            .map(|v| v.iter().filter(|r| self.runs_here(&r.snap.vm_id)).count() as u64)
            .unwrap_or(0);
        self.uploads.status(queued)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_limit() {
        let max = Duration::from_secs(300);
        let waits: Vec<u64> = (1..=11).map(|n| backoff(n, max).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff(u32::MAX, max), max);
        assert_eq!(backoff(3, Duration::from_secs(2)), Duration::from_secs(2));
    }
}
