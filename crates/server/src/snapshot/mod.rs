//! Snapshots: capture (suspend or checkpoint), upload to S3 as chunks, restore.
//!
//! Local layout: `<data>/snapshots/<snapshot-id>/{state,mem}` hold the device
//! state and the sparse RAM image; disk layers stay in the VM's directory
//! (`disk.qcow2`, `layer-*.qcow2`), immutable once frozen, shared by the
//! snapshots that reference them.

mod capture;
mod compact;
pub mod gc;
pub mod manifest;
mod restore;
mod retention;

use std::path::PathBuf;
use std::sync::Arc;

use hatch_chunks::ChunkStore;

use crate::db::SnapshotRecord;
use crate::error::ApiError;
use crate::manager::{VmManager, new_id, now_rfc3339};
use crate::model::{CreateSnapshot, RestoreRequest, Snapshot, SnapshotStatus, Vm, VmState};
use crate::runtime::VmRuntime;

/// QEMU block node name for a disk layer file: its stem ("disk", "layer-…").
pub fn node_name(layer_file: &str) -> String {
    layer_file
        .strip_suffix(".qcow2")
        .unwrap_or(layer_file)
        .to_string()
}

/// A fresh, unique layer file name.
pub(crate) fn new_layer_name() -> String {
    format!("{}.qcow2", new_id("layer"))
}

impl VmManager {
    /// At start-up, after VMs are recovered: snapshots cut short by a restart
    /// either resume their upload (the local copy is complete) or fail.
    pub async fn recover_snapshots(self: &Arc<Self>) -> anyhow::Result<()> {
        for vm in self.db.list_vms()? {
            for mut rec in self.db.list_snapshots(&vm.vm.id)? {
                match rec.snap.status {
                    SnapshotStatus::Ready | SnapshotStatus::Failed => {}
                    SnapshotStatus::Uploading if rec.local => match self.storage.clone() {
                        Some(store) => {
                            tracing::info!(snapshot = %rec.snap.id, "resuming interrupted upload");
                            let this = self.clone();
                            let vm = vm.vm.clone();
                            self.tasks
                                .spawn(async move { this.finish_upload(rec, store, vm).await });
                        }
                        None => {
                            rec.snap.status = SnapshotStatus::Failed;
                            rec.snap.error = Some(
                                "S3 is no longer configured; the local copy stays restorable"
                                    .into(),
                            );
                            self.save_record(&rec);
                        }
                    },
                    _ => {
                        rec.snap.status = SnapshotStatus::Failed;
                        rec.snap.error = Some("interrupted by a daemon restart".into());
                        self.save_record(&rec);
                    }
                }
            }
        }
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
    pub fn snapshot(
        self: &Arc<Self>,
        vm_id: &str,
        req: CreateSnapshot,
        trigger: &str,
    ) -> Result<Snapshot, ApiError> {
        let store = self.storage()?;
        let rt = self.runtime(vm_id)?;
        let guard = rt.try_begin("snapshot")?;
        let state = rt.state();
        if state != VmState::Running {
            return Err(ApiError::conflict(format!(
                "vm '{vm_id}' is {state}; only a running vm can be snapshotted"
            )));
        }
        let vm = self.get(vm_id)?;
        let rec = SnapshotRecord {
            snap: Snapshot {
                id: new_id("snap"),
                vm_id: vm_id.to_string(),
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
        };
        self.db.save_snapshot(&rec)?;
        self.transition(&rt, VmState::Snapshotting, None)?;
        let snap = rec.snap.clone();
        let stop = req.stop.unwrap_or(false);
        let this = self.clone();
        self.tasks.spawn(async move {
            this.run_snapshot(rt, guard, rec, stop, store, vm).await;
        });
        Ok(snap)
    }

    pub fn list_snapshots(&self, vm_id: &str) -> Result<Vec<Snapshot>, ApiError> {
        self.storage()?;
        self.runtime(vm_id)?;
        Ok(self
            .db
            .list_snapshots(vm_id)?
            .into_iter()
            .map(|r| r.snap)
            .collect())
    }

    fn snapshot_record(&self, vm_id: &str, snapshot_id: &str) -> Result<SnapshotRecord, ApiError> {
        self.runtime(vm_id)?;
        match self.db.get_snapshot(snapshot_id)? {
            Some(r) if r.snap.vm_id == vm_id => Ok(r),
            _ => Err(ApiError::not_found("snapshot", snapshot_id)),
        }
    }

    pub fn get_snapshot(&self, vm_id: &str, snapshot_id: &str) -> Result<Snapshot, ApiError> {
        self.storage()?;
        Ok(self.snapshot_record(vm_id, snapshot_id)?.snap)
    }

    /// Delete a snapshot: its manifest in S3 and its local copy. Chunks are
    /// shared between snapshots and are left for garbage collection.
    pub async fn delete_snapshot(&self, vm_id: &str, snapshot_id: &str) -> Result<(), ApiError> {
        let store = self.storage()?;
        let rt = self.runtime(vm_id)?;
        let _guard = rt.try_begin("snapshot delete")?;
        let rec = self.snapshot_record(vm_id, snapshot_id)?;
        if matches!(
            rec.snap.status,
            SnapshotStatus::Pending | SnapshotStatus::Capturing | SnapshotStatus::Uploading
        ) {
            return Err(ApiError::conflict(format!(
                "snapshot '{snapshot_id}' is {}; wait until it is ready or failed",
                rec.snap.status.as_str()
            )));
        }
        if rt.state() == VmState::Snapshotted && self.is_last_restorable(vm_id, snapshot_id)? {
            return Err(ApiError::conflict(format!(
                "snapshot '{snapshot_id}' holds the state of suspended vm '{vm_id}'; restore or delete the vm instead"
            )));
        }
        store
            .delete(&manifest::manifest_key(vm_id, snapshot_id))
            .await
            .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("deleting manifest")))?;
        self.db.delete_snapshot(snapshot_id)?;
        let _ = std::fs::remove_dir_all(self.snapshot_dir(snapshot_id));
        Ok(())
    }

    fn is_last_restorable(&self, vm_id: &str, snapshot_id: &str) -> Result<bool, ApiError> {
        let restorable: Vec<_> = self
            .db
            .list_snapshots(vm_id)?
            .into_iter()
            .filter(|r| r.snap.status == SnapshotStatus::Ready || r.local)
            .collect();
        Ok(restorable.len() == 1 && restorable[0].snap.id == snapshot_id)
    }

    /// Start restoring; answers at once with the VM (`restoring`).
    pub fn restore(self: &Arc<Self>, vm_id: &str, req: RestoreRequest) -> Result<Vm, ApiError> {
        let since = std::time::Instant::now();
        let store = self.storage()?;
        let rt = self.runtime(vm_id)?;
        let guard = rt.try_begin("restore")?;
        let (rec, prior) = self.begin_restore(&rt, req.snapshot_id.as_deref())?;
        let this = self.clone();
        self.tasks.spawn(async move {
            this.run_restore(rt, guard, rec, prior, store, WakeCause::api(since))
                .await;
        });
        self.get(vm_id)
    }

    /// Under the operation lock: check the VM can be restored, pick the
    /// snapshot (`snapshot_id`, else the newest restorable) and enter
    /// `restoring`. Returns the snapshot and the state before.
    pub(crate) fn begin_restore(
        &self,
        rt: &VmRuntime,
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
        let rec = match snapshot_id {
            Some(sid) => {
                let rec = self.snapshot_record(vm_id, sid)?;
                if rec.snap.status != SnapshotStatus::Ready && !rec.local {
                    return Err(ApiError::conflict(format!(
                        "snapshot '{sid}' is {} and cannot be restored",
                        rec.snap.status.as_str()
                    )));
                }
                rec
            }
            None => self
                .db
                .list_snapshots(vm_id)?
                .into_iter()
                .find(|r| r.snap.status == SnapshotStatus::Ready || r.local)
                .ok_or_else(|| {
                    ApiError::conflict(format!("vm '{vm_id}' has no restorable snapshot"))
                })?,
        };
        self.transition(rt, VmState::Restoring, None)?;
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
