//! Retention policies and storage accounting.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hatch_snapshot::retention::{self, Candidate, Policy};

use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::manager::VmManager;
use crate::model::{Retention, SnapshotStatus, Storage, StorageUsage, VmStorage};
use crate::state::SnapshotRecord;

const MAX_KEEP_LAST: u32 = 10_000;
/// How often age-based retention runs in the background.
const RETENTION_INTERVAL: Duration = Duration::from_secs(60);

impl VmManager {
    pub async fn set_retention(
        self: &Arc<Self>,
        vm_id: &str,
        r: Retention,
    ) -> Result<Retention, ApiError> {
        self.storage()?;
        self.supervisor(vm_id)?;
        if let Some(k) = r.keep_last
            && !(1..=MAX_KEEP_LAST).contains(&k)
        {
            return Err(ApiError::invalid(format!(
                "keep_last must be between 1 and {MAX_KEEP_LAST}, got {k}"
            )));
        }
        if r.max_age_seconds == Some(0) {
            return Err(ApiError::invalid("max_age_seconds must be at least 1"));
        }
        self.store.set_retention(vm_id, &r).await?;
        self.apply_retention(vm_id, None).await?;
        Ok(r)
    }

    pub async fn retention(&self, vm_id: &str) -> Result<Retention, ApiError> {
        self.storage()?;
        self.known_vm(vm_id).await?;
        Ok(self.store.retention(vm_id).await?)
    }

    /// Delete the snapshots the VM's policy no longer keeps. `just_ready` is
    /// a snapshot whose upload has succeeded but which is not recorded as
    /// ready yet: retention runs before anyone can see it ready, so that it
    /// never holds the VM's operation lock after the caller saw "ready".
    pub async fn apply_retention(
        &self,
        vm_id: &str,
        just_ready: Option<&SnapshotRecord>,
    ) -> Result<(), ApiError> {
        let policy = self.store.retention(vm_id).await?;
        if policy == Retention::default() {
            return Ok(());
        }
        let store = self.storage()?;
        let rt = self.supervisor(vm_id)?;
        // Not during a restore that may read one of these snapshots.
        let _guard = rt.begin("retention").await;
        let mut snapshots = self.store.list_snapshots(vm_id).await?; // newest first
        if let Some(ready) = just_ready {
            for r in snapshots.iter_mut().filter(|r| r.snap.id == ready.snap.id) {
                *r = ready.clone();
            }
        }
        let candidates: Vec<Candidate> = snapshots
            .iter()
            .map(|r| Candidate {
                id: &r.snap.id,
                finished: matches!(
                    r.snap.status,
                    SnapshotStatus::Ready | SnapshotStatus::Failed
                ),
                restorable: r.snap.status == SnapshotStatus::Ready || r.local,
                created: humantime::parse_rfc3339(&r.snap.created_at).ok(),
            })
            .collect();
        let policy = Policy {
            keep_last: policy.keep_last,
            max_age_seconds: policy.max_age_seconds,
        };
        for id in retention::plan(policy, &candidates, SystemTime::now()) {
            self.store
                .delete_snapshot(
                    id,
                    &super::manifest::manifest_key(vm_id, id),
                    &crate::manager::now_rfc3339(),
                )
                .await?;
            self.delete_manifest(&store, vm_id, id).await;
            let _ = std::fs::remove_dir_all(self.snapshot_dir(id));
            tracing::info!(vm = %vm_id, snapshot = %id, "retention deleted snapshot");
        }
        Ok(())
    }

    /// Apply every VM's retention policy once a minute (for `max_age_seconds`).
    pub async fn retention_worker(self: Arc<Self>, shutdown: CancellationToken) {
        let mut rounds: u64 = 0;
        loop {
            rounds += 1;
            // Chunk garbage collection once an hour.
            if rounds.is_multiple_of(60)
                && self.storage.is_some()
                && let Err(e) = self.collect_garbage().await
            {
                tracing::warn!(error = %e, "garbage collection failed");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RETENTION_INTERVAL) => {}
            }
            // Without S3 there are no snapshots to keep or delete (and a
            // warning per VM each minute would only be noise).
            if self.storage.is_none() {
                continue;
            }
            let Ok(vms) = self.store.list_vms().await else {
                continue;
            };
            // Each node applies the policies of the VMs it runs.
            for vm in vms.iter().filter(|vm| self.runs_here(&vm.vm.id)) {
                if let Err(e) = self.apply_retention(&vm.vm.id, None).await {
                    tracing::warn!(vm = %vm.vm.id, error = %e, "retention failed");
                }
            }
            self.enforce_local_budget().await;
        }
    }

    /// S3 use by VM, from the ready snapshots' records.
    pub async fn storage_usage(&self) -> Result<Storage, ApiError> {
        self.storage()?;
        let mut total = StorageUsage::default();
        let mut vms = Vec::new();
        for vm in self.store.list_vms().await? {
            let mut usage = StorageUsage::default();
            for rec in self.store.list_snapshots(&vm.vm.id).await? {
                if rec.snap.status != SnapshotStatus::Ready {
                    continue;
                }
                usage.snapshots += 1;
                usage.logical_bytes += rec.snap.memory_bytes + rec.snap.disk_bytes;
                usage.stored_bytes += rec.snap.stored_bytes;
            }
            total.snapshots += usage.snapshots;
            total.logical_bytes += usage.logical_bytes;
            total.stored_bytes += usage.stored_bytes;
            vms.push(VmStorage {
                vm_id: vm.vm.id,
                name: vm.vm.name,
                usage,
            });
        }
        Ok(Storage {
            total,
            vms,
            uploads: self.upload_status().await,
            local: self.local_usage().await,
            pending_deletes: self
                .store
                .pending_deletes()
                .await
                .map(|p| p.len() as u64)
                .unwrap_or(0),
        })
    }
}
