//! Snapshots: capture (suspend or checkpoint), upload to S3 as chunks, restore.
//!
//! Local layout: `<data>/snapshots/<snapshot-id>/{state,mem}` hold the device
//! state and the sparse RAM image; disk layers stay in the VM's directory
//! (`disk.qcow2`, `layer-*.qcow2`), immutable once frozen, shared by the
//! snapshots that reference them.

mod capture;
mod compact;
mod fork;
pub mod gc;
pub mod lazy;
mod local_cache;
mod next_layer;
mod restore;
mod retention;
pub mod standby;
pub mod uploads;

pub use hatch_snapshot::names::new_layer_name;
use hatch_snapshot::recovery::{self, AfterRestart};
pub use hatch_snapshot::{local_copy, manifest, names, seal};

use std::path::PathBuf;
use std::sync::Arc;

use hatch_chunks::ChunkStore;

use crate::error::ApiError;
use crate::manager::{VmManager, new_id, now_rfc3339};
use crate::model::{
    CreateSnapshot, RestoreRequest, Snapshot, SnapshotKind, SnapshotStatus, Vm, VmState,
};
use crate::state::SnapshotRecord;
use crate::supervisor::VmSupervisor;

/// What was read back (from S3 or the local copy) is not what Hatch wrote:
/// the restore fails with `snapshot_corrupt` and older snapshots remain.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SnapshotCorrupt(pub String);

/// QEMU block node name for a disk layer file: its stem ("disk", "layer-…").
pub fn node_name(layer_file: &str) -> String {
    layer_file
        .strip_suffix(".qcow2")
        .unwrap_or(layer_file)
        .to_string()
}

impl VmManager {
    /// At start-up, after VMs are recovered: snapshots cut short by a
    /// restart. Uploads resume in the storage worker (`uploading` with a
    /// complete local copy); a checkpoint whose files were all written (its
    /// sealed description checks out) is kept; anything else failed.
    pub async fn recover_snapshots(self: &Arc<Self>) -> anyhow::Result<()> {
        for vm in self.store.list_vms().await? {
            // Another node's snapshots are its to recover (`recover` made
            // supervisors for this node's VMs only).
            if !self.runs_here(&vm.vm.id) {
                continue;
            }
            let vm_failed = self
                .supervisor(&vm.vm.id)
                .is_ok_and(|rt| rt.state() == VmState::Failed);
            for mut rec in self.store.list_snapshots(&vm.vm.id).await? {
                let capturing = rec.snap.status == SnapshotStatus::Capturing;
                let is = |kind| capturing && rec.snap.kind == kind;
                // Read only what the decision may need.
                let verified_copy = if is(SnapshotKind::Checkpoint) {
                    local_copy::LocalCopy::verify(
                        &self.snapshot_dir(&rec.snap.id),
                        &self.paths(&vm.vm.id).dir,
                        &rec.snap.id,
                        &vm.vm.id,
                        vm.vm.memory_mib << 20,
                        &self.seal_keys,
                    )
                    .ok()
                } else {
                    None
                };
                let found = recovery::Found {
                    status: rec.snap.status,
                    kind: rec.snap.kind,
                    local: rec.local,
                    checkpoint_verified: verified_copy.is_some(),
                    vm_failed,
                    state_saved: is(SnapshotKind::Suspend)
                        && self.snapshot_dir(&rec.snap.id).join("state").exists(),
                };
                match recovery::after_restart(found) {
                    AfterRestart::Leave => {}
                    AfterRestart::KeepCheckpoint => {
                        if let Some(copy) = verified_copy {
                            rec.layers = copy.layer_names();
                        }
                        rec.local = true;
                        rec.local_used_at = Some(now_rfc3339());
                        rec.snap.status = SnapshotStatus::Uploading;
                        self.save_record(&rec).await;
                        tracing::info!(snapshot = %rec.snap.id, "kept a checkpoint completed before a restart");
                    }
                    AfterRestart::Fail => {
                        rec.snap.status = SnapshotStatus::Failed;
                        rec.snap.error = Some("interrupted by a daemon restart".into());
                        rec.local = false;
                        self.save_record(&rec).await;
                    }
                }
            }
        }
        if self.storage.is_none() {
            for mut rec in self
                .store
                .snapshots_with_status(SnapshotStatus::Uploading)
                .await?
                .into_iter()
                .filter(|r| self.runs_here(&r.snap.vm_id))
            {
                rec.snap.error = Some(
                    "S3 is not configured; the upload waits for it and the local copy stays restorable"
                        .into(),
                );
                self.save_record(&rec).await;
            }
        }
        self.uploads.kick();
        Ok(())
    }

    pub(crate) fn storage(&self) -> Result<Arc<ChunkStore>, ApiError> {
        self.storage
            .clone()
            .ok_or(ApiError::SnapshotStorageUnavailable)
    }

    pub fn snapshot_dir(&self, snapshot_id: &str) -> PathBuf {
        self.cfg.data_dir.join("snapshots").join(snapshot_id)
    }

    /// Start a snapshot; answers at once with the `pending` record.
    pub async fn snapshot(
        self: &Arc<Self>,
        vm_id: &str,
        req: CreateSnapshot,
        trigger: &str,
    ) -> Result<Snapshot, ApiError> {
        self.storage()?;
        let rt = self.supervisor(vm_id)?;
        // An idle suspend holds the VM's requests from its claim on: it
        // does not wait for housekeeping (it tries again at the next tick).
        let guard = if trigger == "idle" {
            rt.try_begin_now("snapshot")?
        } else {
            rt.try_begin("snapshot").await?
        };
        let state = rt.state();
        if state != VmState::Running {
            return Err(ApiError::conflict(format!(
                "vm '{vm_id}' is {state}; only a running vm can be snapshotted"
            )));
        }
        let vm = self.get(vm_id).await?;
        let stop = req.stop.unwrap_or(false);
        let rec = SnapshotRecord {
            snap: Snapshot {
                id: new_id("snap"),
                vm_id: vm_id.to_string(),
                kind: if stop {
                    SnapshotKind::Suspend
                } else {
                    SnapshotKind::Checkpoint
                },
                status: SnapshotStatus::Pending,
                created_at: now_rfc3339(),
                trigger: trigger.to_string(),
                memory_bytes: vm.memory_mib << 20,
                disk_bytes: 0,
                stored_bytes: 0,
                pause_ms: None,
                error: None,
            },
            local: false,
            layers: Vec::new(),
            local_used_at: None,
            upload_attempts: 0,
        };
        self.store.save_snapshot(&rec).await?;
        self.transition(&rt, VmState::Snapshotting, None).await?;
        let snap = rec.snap.clone();
        let this = self.clone();
        self.tasks.spawn(async move {
            this.run_snapshot(rt, guard, rec).await;
        });
        Ok(snap)
    }

    pub async fn list_snapshots(&self, vm_id: &str) -> Result<Vec<Snapshot>, ApiError> {
        self.storage()?;
        self.known_vm(vm_id).await?;
        Ok(self
            .store
            .list_snapshots(vm_id)
            .await?
            .into_iter()
            .map(|r| r.snap)
            .collect())
    }

    async fn snapshot_record(
        &self,
        vm_id: &str,
        snapshot_id: &str,
    ) -> Result<SnapshotRecord, ApiError> {
        self.known_vm(vm_id).await?;
        match self.store.get_snapshot(snapshot_id).await? {
            Some(r) if r.snap.vm_id == vm_id => Ok(r),
            _ => Err(ApiError::not_found("snapshot", snapshot_id)),
        }
    }

    pub async fn get_snapshot(&self, vm_id: &str, snapshot_id: &str) -> Result<Snapshot, ApiError> {
        self.storage()?;
        Ok(self.snapshot_record(vm_id, snapshot_id).await?.snap)
    }

    /// Delete a snapshot: its manifest in S3 and its local copy. Chunks are
    /// shared between snapshots and are left for garbage collection. An
    /// upload in progress is stopped first; a manifest deletion that fails
    /// is retried by the storage worker.
    pub async fn delete_snapshot(&self, vm_id: &str, snapshot_id: &str) -> Result<(), ApiError> {
        let store = self.storage()?;
        let rt = self.supervisor(vm_id)?;
        let _guard = rt.try_begin("snapshot delete").await?;
        let rec = self.snapshot_record(vm_id, snapshot_id).await?;
        if matches!(
            rec.snap.status,
            SnapshotStatus::Pending | SnapshotStatus::Capturing
        ) {
            return Err(ApiError::conflict(format!(
                "snapshot '{snapshot_id}' is {}; wait until it is captured",
                rec.snap.status.as_str()
            )));
        }
        if rt.state() == VmState::Snapshotted
            && self.is_newest_restorable(vm_id, snapshot_id).await?
        {
            return Err(ApiError::conflict(format!(
                "snapshot '{snapshot_id}' holds the state of suspended vm '{vm_id}' (a wake restores it); restore or delete the vm instead"
            )));
        }
        self.cancel_uploads(&[snapshot_id.to_string()]).await;
        self.store
            .delete_snapshot(
                snapshot_id,
                &manifest::manifest_key(vm_id, snapshot_id),
                &now_rfc3339(),
            )
            .await?;
        let _ = std::fs::remove_dir_all(self.snapshot_dir(snapshot_id));
        self.delete_manifest(&store, vm_id, snapshot_id).await;
        Ok(())
    }

    /// Whether `snapshot_id` is the one a wake of the VM would restore.
    async fn is_newest_restorable(&self, vm_id: &str, snapshot_id: &str) -> Result<bool, ApiError> {
        Ok(self
            .newest_restorable(vm_id)
            .await?
            .is_some_and(|r| r.snap.id == snapshot_id))
    }

    /// The snapshot a wake of the VM restores: its newest in S3 or here.
    pub(crate) async fn newest_restorable(
        &self,
        vm_id: &str,
    ) -> Result<Option<SnapshotRecord>, crate::state::StoreError> {
        Ok(self
            .store
            .list_snapshots(vm_id)
            .await?
            .into_iter()
            .find(|r| r.snap.status == SnapshotStatus::Ready || r.local))
    }

    /// Start restoring; answers at once with the VM (`restoring`).
    pub async fn restore(
        self: &Arc<Self>,
        vm_id: &str,
        req: RestoreRequest,
    ) -> Result<Vm, ApiError> {
        let since = std::time::Instant::now();
        let rt = self.supervisor(vm_id)?;
        // Without S3 only local copies can be restored: say so at once when
        // there is none (whatever else the VM is doing).
        if self.storage.is_none()
            && !self
                .store
                .list_snapshots(vm_id)
                .await?
                .iter()
                .any(|r| r.local)
        {
            return Err(ApiError::SnapshotStorageUnavailable);
        }
        let guard = rt.try_begin("restore").await?;
        let (rec, prior) = self.begin_restore(&rt, req.snapshot_id.as_deref()).await?;
        let this = self.clone();
        let store = self.storage.clone();
        self.tasks.spawn(async move {
            this.run_restore(rt, guard, rec, prior, store, WakeCause::api(since))
                .await;
        });
        self.get(vm_id).await
    }

    /// Under the operation lock: check the VM can be restored, pick the
    /// snapshot (`snapshot_id`, else the newest restorable) and enter
    /// `restoring`. Returns the snapshot and the state before.
    pub(crate) async fn begin_restore(
        &self,
        rt: &VmSupervisor,
        snapshot_id: Option<&str>,
    ) -> Result<(SnapshotRecord, VmState), ApiError> {
        let vm_id = rt.id.as_str();
        let state = rt.state();
        if !matches!(
            state,
            VmState::Running | VmState::Snapshotted | VmState::Stopped | VmState::Failed
        ) {
            return Err(ApiError::conflict(format!(
                "vm '{vm_id}' is {state} and cannot be restored now"
            )));
        }
        // Without S3, only a snapshot with a local copy can be restored.
        let unavailable = |e: ApiError| match self.storage {
            None => ApiError::SnapshotStorageUnavailable,
            Some(_) => e,
        };
        let rec = match snapshot_id {
            Some(sid) => {
                let rec = self
                    .snapshot_record(vm_id, sid)
                    .await
                    .map_err(unavailable)?;
                if rec.snap.status != SnapshotStatus::Ready && !rec.local {
                    return Err(ApiError::conflict(format!(
                        "snapshot '{sid}' is {} and cannot be restored",
                        rec.snap.status.as_str()
                    )));
                }
                rec
            }
            None => self.newest_restorable(vm_id).await?.ok_or_else(|| {
                unavailable(ApiError::conflict(format!(
                    "vm '{vm_id}' has no restorable snapshot"
                )))
            })?,
        };
        if self.storage.is_none() {
            // Only a local copy that checks out can be restored.
            let vm = self.get(vm_id).await?;
            if let Err(why) = self.verified_local_copy(&rec, &vm).await {
                tracing::warn!(vm = %vm_id, snapshot = %rec.snap.id, %why, "no usable local copy");
                return Err(ApiError::SnapshotStorageUnavailable);
            }
        }
        self.transition(rt, VmState::Restoring, None).await?;
        Ok((rec, state))
    }
}

/// Why a restore runs, for the wake event of a suspended VM.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WakeCause {
    /// `api` or `request`.
    pub trigger: &'static str,
    /// When the wake was asked for (the first held request, or the API call).
    pub since: std::time::Instant,
}

impl WakeCause {
    pub fn api(since: std::time::Instant) -> Self {
        WakeCause {
            trigger: "api",
            since,
        }
    }
}
