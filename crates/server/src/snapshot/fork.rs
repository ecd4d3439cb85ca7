//! Fork: a new VM started from a snapshot of another (`POST /vms` with
//! `from_snapshot`). It resumes the captured guest (memory, disk, devices)
//! under a new id, name and host ports, with its clock set and its RNG
//! reseeded by the guest agent; the source VM and its snapshot are
//! untouched.
//!
//! The fork gets files of its own: the snapshot's disk chain flattened into
//! one layer over the image (so deleting the source never breaks the fork),
//! a sparse copy of the RAM image, and the device state. The source VM's
//! operation lock is held only while these are copied, so that no
//! retention, eviction or deletion removes them meanwhile.

use std::sync::Arc;

use anyhow::Context;

use super::SnapshotCorrupt;
use crate::error::ApiError;
use crate::manager::{VmManager, new_id, now_rfc3339};
use crate::model::{CreateVm, SnapshotStatus, Vm, VmState};
use crate::state::SnapshotRecord;
use crate::supervisor::{OpGuard, VmSupervisor};

/// The fork's first disk layer (as a created VM's).
const BASE_LAYER: &str = "disk.qcow2";

impl VmManager {
    pub(crate) async fn fork(self: &Arc<Self>, req: CreateVm, sid: &str) -> Result<Vm, ApiError> {
        if req.image.is_some()
            || req.vcpus.is_some()
            || req.memory_mib.is_some()
            || req.disk_mib.is_some()
            || req.env.is_some()
            || req.cmd.is_some()
            || req.restart.is_some()
            || req.egress.is_some()
        {
            return Err(ApiError::invalid(
                "a fork has its snapshot's image, vcpus, memory, disk and app settings: give only name and from_snapshot",
            ));
        }
        let rec = self
            .store
            .get_snapshot(sid)
            .await?
            .ok_or_else(|| ApiError::not_found("snapshot", sid))?;
        if rec.snap.status != SnapshotStatus::Ready && !rec.local {
            return Err(ApiError::conflict(format!(
                "snapshot '{sid}' is {} and cannot be forked",
                rec.snap.status.as_str()
            )));
        }
        if self.storage.is_none() && !rec.local {
            return Err(ApiError::SnapshotStorageUnavailable);
        }
        let source = self.get(&rec.snap.vm_id).await?;
        let id = new_id("vm");
        let name = self.free_name(req.name, &id).await?;
        let paths = self.paths(&id);
        std::fs::create_dir_all(&paths.dir)
            .with_context(|| format!("creating {}", paths.dir.display()))?;
        let vm = Vm {
            state_reason: Some(format!("forking from snapshot {sid} of {}", source.id)),
            vcpus: source.vcpus,
            memory_mib: source.memory_mib,
            disk_mib: source.disk_mib,
            // Its app was started with these (and restarts with them).
            settings: source.settings.clone(),
            ..Vm::fresh(
                id.clone(),
                name,
                VmState::Restoring,
                source.image.clone(),
                now_rfc3339(),
            )
        };
        if let Err(e) = self.insert_vm(&vm).await {
            let _ = std::fs::remove_dir_all(&paths.dir);
            return Err(e);
        }
        let rt = VmSupervisor::new(id.clone(), VmState::Restoring, Vec::new());
        let guard = rt.try_begin("fork").await?;
        self.insert_supervisor(rt.clone());
        tracing::info!(vm = %id, name = %vm.name, snapshot = %sid, source = %source.id, "vm forked");
        let this = self.clone();
        self.tasks
            .spawn(async move { this.run_fork(rt, guard, rec, source).await });
        Ok(vm)
    }

    async fn run_fork(
        self: Arc<Self>,
        rt: Arc<VmSupervisor>,
        guard: OpGuard,
        rec: SnapshotRecord,
        source: Vm,
    ) {
        let started = std::time::Instant::now();
        let result = async {
            let staging = self.copy_for_fork(&rt, &rec, &source).await?;
            self.faults.hit("fork.copied", &rt.id)?;
            self.start_from(&rt, &rec.snap.id, &staging, &[BASE_LAYER.to_string()], None)
                .await
        }
        .await;
        let _ = std::fs::remove_dir_all(self.paths(&rt.id).dir.join("fork"));
        match result {
            Ok(machine) => {
                let done = match self.transition(&rt, VmState::Running, None).await {
                    Ok(()) => self
                        .store
                        .set_vm_started(&rt.id, &now_rfc3339())
                        .await
                        .map_err(ApiError::from),
                    Err(e) => Err(e),
                };
                if let Err(e) = done {
                    tracing::error!(vm = %rt.id, error = %e, "recording the fork failed");
                }
                self.watch(rt.clone(), machine);
                tracing::info!(vm = %rt.id, snapshot = %rec.snap.id,
                    fork_ms = started.elapsed().as_millis() as u64, "fork runs");
            }
            Err(e) => {
                let mut reason = format!("fork from {} failed: {e:#}", rec.snap.id);
                if e.chain()
                    .any(|c| c.downcast_ref::<SnapshotCorrupt>().is_some())
                {
                    reason = format!("snapshot_corrupt: {reason}");
                }
                tracing::error!(vm = %rt.id, %reason);
                self.halt(&rt).await;
                if let Err(e) = self.transition(&rt, VmState::Failed, Some(reason)).await {
                    tracing::error!(vm = %rt.id, error = %e, "recording the failed fork failed");
                }
            }
        }
        drop(guard);
    }

    /// Give the fork its own disk layer, RAM file and device state (in a
    /// staging dir, returned) from the snapshot's local copy, fetched from
    /// S3 first if there is none.
    async fn copy_for_fork(
        &self,
        rt: &VmSupervisor,
        rec: &SnapshotRecord,
        source: &Vm,
    ) -> anyhow::Result<std::path::PathBuf> {
        let source_rt = self
            .supervisor(&source.id)
            .map_err(|_| anyhow::anyhow!("the source vm {} was deleted", source.id))?;
        let _source_guard = source_rt.begin("fork").await;
        // Re-read: deleted (or its copy evicted) while we waited?
        let rec = self
            .store
            .get_snapshot(&rec.snap.id)
            .await?
            .with_context(|| format!("snapshot {} was deleted", rec.snap.id))?;
        let _in_use = self.use_local_copy(&rec.snap.id);
        let layers = match self.verified_local_copy(&rec, source).await {
            Ok(layers) => layers,
            Err(why) => {
                let store = self.storage.clone().with_context(|| {
                    format!(
                        "snapshot storage is unavailable (no S3 configured) and the local copy cannot be used ({why})"
                    )
                })?;
                let (layers, _) = self.fetch(&source_rt, &rec, source, &store, true).await?;
                self.trust_fetched_copy_when_durable(&rec, &layers);
                layers
            }
        };
        let top = self
            .paths(&source.id)
            .dir
            .join(layers.last().context("snapshot has no disk layer")?);
        let image = self
            .image(&source.image)
            .await
            .with_context(|| format!("image '{}'", source.image))?;
        let paths = self.paths(&rt.id);
        // Under a temporary name: a fork that fails half way leaves no disk
        // that a later start would boot from.
        let disk = paths.dir.join(BASE_LAYER);
        let part = crate::durable::partial(&disk);
        hatch_vmm::disk::flatten_onto(&top, &image.disk, &image.disk_format, &part)
            .await
            .context("copying the snapshot's disk")?;
        std::fs::rename(&part, &disk).context("placing the fork's disk")?;
        let snapshot_dir = self.snapshot_dir(&rec.snap.id);
        let staging = paths.dir.join("fork");
        std::fs::create_dir_all(&staging)?;
        std::fs::copy(snapshot_dir.join("state"), staging.join("state"))
            .context("copying the device state")?;
        let (src, dst) = (snapshot_dir.join("mem"), paths.mem.clone());
        tokio::task::spawn_blocking(move || hatch_image::copy_sparse_unsynced(&src, &dst))
            .await
            .context("copy task")?
            .context("copying the RAM image")?;
        Ok(staging)
    }
}
