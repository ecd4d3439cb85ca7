//! Capture: freeze what must be frozen while the guest is paused, let it go
//! (checkpoint) or end it (suspend), then upload while it runs or is gone.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use hatch_chunks::ChunkStore;
use hatch_vmm::Machine;

use super::manifest::{Layer, MANIFEST_VERSION, Manifest, manifest_key};
use super::{new_layer_name, node_name};
use crate::db::SnapshotRecord;
use crate::manager::VmManager;
use crate::model::{SnapshotStatus, Vm, VmState};
use crate::runtime::{OpGuard, VmRuntime};

impl VmManager {
    pub(super) async fn run_snapshot(
        self: Arc<Self>,
        rt: Arc<VmRuntime>,
        guard: OpGuard,
        mut rec: SnapshotRecord,
        stop: bool,
        store: Arc<ChunkStore>,
        vm: Vm,
    ) {
        rec.snap.status = SnapshotStatus::Capturing;
        self.save_record(&rec);
        let captured = if stop {
            self.capture_suspend(&rt, &mut rec).await
        } else {
            self.capture_checkpoint(&rt, &mut rec).await
        };
        if let Err(e) = captured {
            let reason = format!("capture failed: {e:#}");
            tracing::error!(vm = %rt.id, snapshot = %rec.snap.id, %reason);
            rec.snap.status = SnapshotStatus::Failed;
            rec.snap.error = Some(reason);
            self.save_record(&rec);
            // The guest was resumed (or never paused) if its QEMU lives.
            let to = if rt.machine().is_some() {
                VmState::Running
            } else {
                VmState::Failed
            };
            let _ = self.transition(&rt, to, rec.snap.error.clone());
            rt.release_idle();
            if rec.snap.trigger == "idle" {
                self.record_idle_suspend(&rt.id, &rec.snap.id, None, rec.snap.error.clone());
            }
            return;
        }
        rec.local = true;
        rec.snap.status = SnapshotStatus::Uploading;
        self.save_record(&rec);
        let to = if stop {
            VmState::Snapshotted
        } else {
            VmState::Running
        };
        if let Err(e) = self.transition(&rt, to, None) {
            tracing::error!(vm = %rt.id, error = %e, "recording snapshot state failed");
        }
        rt.release_idle();
        if rec.snap.trigger == "idle" {
            self.record_idle_suspend(&rt.id, &rec.snap.id, rec.snap.pause_ms, None);
        }
        // The VM is free for other operations while the upload runs.
        drop(guard);
        tracing::info!(vm = %rt.id, snapshot = %rec.snap.id, pause_ms = rec.snap.pause_ms, "captured");

        self.finish_upload(rec, store, vm).await;
    }

    /// Upload a captured snapshot and record the outcome.
    pub(super) async fn finish_upload(
        &self,
        mut rec: SnapshotRecord,
        store: Arc<ChunkStore>,
        vm: Vm,
    ) {
        let started = Instant::now();
        match self.upload(&rec, &store, &vm).await {
            Ok(stored) => {
                rec.snap.stored_bytes = stored;
                rec.snap.status = SnapshotStatus::Ready;
                if let Err(e) = self.apply_retention(&vm.id, Some(&rec)).await {
                    tracing::warn!(vm = %vm.id, error = %e, "retention failed");
                }
                tracing::info!(vm = %vm.id, snapshot = %rec.snap.id, stored_bytes = stored,
                    upload_ms = started.elapsed().as_millis() as u64, "snapshot ready");
            }
            Err(e) => {
                rec.snap.status = SnapshotStatus::Failed;
                rec.snap.error = Some(format!(
                    "upload failed: {e:#}; the local copy stays restorable on this host"
                ));
                tracing::error!(vm = %vm.id, snapshot = %rec.snap.id, error = format!("{e:#}"), "upload failed");
            }
        }
        self.save_record(&rec);
    }

    pub(crate) fn save_record(&self, rec: &SnapshotRecord) {
        // A snapshot deleted meanwhile (with its VM) is not brought back.
        if !matches!(self.db.get_snapshot(&rec.snap.id), Ok(Some(_))) {
            return;
        }
        if let Err(e) = self.db.save_snapshot(rec) {
            tracing::error!(snapshot = %rec.snap.id, error = %e, "recording snapshot failed");
        }
    }

    /// Suspend: pause, save device state, end QEMU; keep RAM and disk locally.
    async fn capture_suspend(
        &self,
        rt: &VmRuntime,
        rec: &mut SnapshotRecord,
    ) -> anyhow::Result<()> {
        let machine = rt.machine().context("vm has no running QEMU")?;
        let dir = self.snapshot_dir(&rec.snap.id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let paths = self.paths(&rt.id);
        let t0 = Instant::now();
        machine.pause().await?;
        // `state` appears only once complete: recovery treats its presence as
        // "the device state is saved".
        let part = dir.join("state.partial");
        let saved = async {
            machine.save_state(&part).await?;
            std::fs::rename(&part, dir.join("state")).map_err(|source| hatch_vmm::VmmError::Io {
                path: part.clone(),
                source,
            })
        };
        if let Err(e) = saved.await {
            resume_guest(&machine).await;
            return Err(e.into());
        }
        // Past this point the guest never runs again in this QEMU: quitting
        // flushes the active disk layer, which becomes frozen.
        rec.snap.pause_ms = Some(t0.elapsed().as_millis() as u64);
        self.halt_keeping_ram(rt, &machine).await;
        rec.layers = self.db.disk_layers(&rt.id)?;
        rec.snap.disk_bytes = layers_size(&paths.dir, &rec.layers);
        self.keep_ram(&rt.id, &rec.snap.id).await?;
        sync_file(&dir.join("state"))?;
        Ok(())
    }

    /// Move a suspended VM's RAM file into the snapshot as `mem`: a rename
    /// (both live in the data dir), then an fsync, so `mem` is always whole
    /// and durable once the capture counts as done.
    async fn keep_ram(&self, vm_id: &str, snapshot_id: &str) -> anyhow::Result<()> {
        let dst = self.snapshot_dir(snapshot_id).join("mem");
        move_file(&self.paths(vm_id).mem, &dst).await?;
        self.remove_runtime_files(vm_id);
        sync_file_async(&dst).await
    }

    /// After a restart: a suspend that had saved the device state and ended
    /// QEMU but not yet kept its RAM is finished now. Returns whether the VM
    /// has a complete local snapshot afterwards.
    pub(crate) async fn complete_interrupted_capture(&self, vm_id: &str) -> anyhow::Result<bool> {
        for mut rec in self.db.list_snapshots(vm_id)? {
            if rec.snap.status != SnapshotStatus::Capturing {
                continue;
            }
            let dir = self.snapshot_dir(&rec.snap.id);
            let ram_kept = dir.join("mem").exists();
            let ram_live = self.paths(vm_id).mem.exists();
            if !dir.join("state").exists() || !(ram_kept || ram_live) {
                continue;
            }
            if ram_kept {
                sync_file_async(&dir.join("mem")).await?;
            } else {
                self.keep_ram(vm_id, &rec.snap.id).await?;
            }
            rec.layers = self.db.disk_layers(vm_id)?;
            rec.local = true;
            // Uploading: recover_snapshots resumes the upload.
            rec.snap.status = SnapshotStatus::Uploading;
            self.save_record(&rec);
            tracing::info!(vm = %vm_id, snapshot = %rec.snap.id, "finished an interrupted suspend");
            return Ok(true);
        }
        Ok(false)
    }

    /// Checkpoint: while paused, switch the disk to a new layer, save device
    /// state and copy RAM; then let the guest run on.
    async fn capture_checkpoint(
        &self,
        rt: &VmRuntime,
        rec: &mut SnapshotRecord,
    ) -> anyhow::Result<()> {
        let machine = rt.machine().context("vm has no running QEMU")?;
        let dir = self.snapshot_dir(&rec.snap.id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let paths = self.paths(&rt.id);
        let layers = self.db.disk_layers(&rt.id)?;
        let top = layers.last().context("vm has no disk layer")?.clone();
        let new_layer = new_layer_name();
        // The copy taken while paused goes to tmpfs when it fits: writing
        // hundreds of MiB into a disk file's page cache can stall on
        // dirty-page throttling. Otherwise straight into the snapshot.
        let vm_mib = self.get(&rt.id)?.memory_mib;
        let fits =
            hatch_vmm::host::fs_free_mib(&self.cfg.run_dir).is_some_and(|free| free > vm_mib + 256);
        let ram_copy = if fits {
            self.cfg.run_dir.join(format!("{}.mem", rec.snap.id))
        } else {
            dir.join("mem.partial")
        };

        let t0 = Instant::now();
        machine.pause().await?;
        let result: anyhow::Result<()> = async {
            // Order matters: freeze the disk layer before saving state. Once
            // the state is saved QEMU has inactivated its block devices until
            // `cont`, and a layer switch would fail.
            machine
                .freeze_disk(
                    &node_name(&top),
                    &paths.dir.join(&new_layer),
                    &node_name(&new_layer),
                )
                .await?;
            let mut all = layers.clone();
            all.push(new_layer.clone());
            self.db.set_disk_layers(&rt.id, &all)?;
            machine.save_state(&dir.join("state")).await?;
            // RAM must be copied before the guest changes it again (tmpfs,
            // split across threads); moving it to disk and making it durable
            // waits until the guest runs again.
            let (src, dst) = (paths.mem.clone(), ram_copy.clone());
            let _ = std::fs::remove_file(&dst);
            tokio::task::spawn_blocking(move || hatch_image::copy_sparse_unsynced(&src, &dst))
                .await
                .context("copy task")??;
            Ok(())
        }
        .await;
        resume_guest(&machine).await;
        rec.snap.pause_ms = Some(t0.elapsed().as_millis() as u64);
        let stored = match result {
            Ok(()) => {
                async {
                    let mem = dir.join("mem");
                    move_file(&ram_copy, &mem).await?;
                    sync_file_async(&mem).await
                }
                .await
            }
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_file(&ram_copy);
        stored?;
        sync_file(&dir.join("state"))?;
        rec.layers = layers;
        rec.snap.disk_bytes = layers_size(&paths.dir, &rec.layers);
        Ok(())
    }

    /// Quit QEMU but keep the RAM file (it is the memory image).
    async fn halt_keeping_ram(&self, rt: &VmRuntime, machine: &Machine) {
        if let Err(e) = machine.quit().await {
            tracing::warn!(vm = %rt.id, error = %e, "quit failed; killing QEMU");
            machine.kill();
            machine.wait_exit().await;
        }
        rt.lock().machine = None;
        self.clear_forwards(rt);
    }

    /// Upload state, memory and disk layers, then the manifest (the commit
    /// point). Returns the bytes newly stored.
    async fn upload(
        &self,
        rec: &SnapshotRecord,
        store: &ChunkStore,
        vm: &Vm,
    ) -> anyhow::Result<u64> {
        // Shared with other uploads; garbage collection waits for it.
        let _gc = self.gc_lock.read().await;
        let dir = self.snapshot_dir(&rec.snap.id);
        let vm_dir = self.paths(&vm.id).dir;
        let mut stored = 0;
        let (device_state, r) = store.upload_file(&dir.join("state")).await?;
        stored += r.stored_bytes;
        let (memory, r) = store.upload_file(&dir.join("mem")).await?;
        stored += r.stored_bytes;
        let mut disk_layers = Vec::new();
        for name in &rec.layers {
            let (chunks, r) = store.upload_file(&vm_dir.join(name)).await?;
            stored += r.stored_bytes;
            disk_layers.push(Layer {
                name: name.clone(),
                chunks,
            });
        }
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            snapshot_id: rec.snap.id.clone(),
            vm_id: vm.id.clone(),
            created_at: rec.snap.created_at.clone(),
            image: vm.image.clone(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            disk_mib: vm.disk_mib,
            qemu_version: self.qemu_version.clone(),
            device_state,
            memory,
            disk_layers,
        };
        let bytes = manifest.encode().context("encoding manifest")?;
        stored += bytes.len() as u64;
        store
            .put(&manifest_key(&vm.id, &rec.snap.id), Bytes::from(bytes))
            .await?;
        Ok(stored)
    }
}

/// Resume a paused guest: at the end of every checkpoint, and when a
/// suspend fails before the point of no return.
async fn resume_guest(machine: &Machine) {
    if let Err(e) = machine.resume().await {
        tracing::error!(pid = machine.pid(), error = %e, "could not resume the guest");
    }
}

fn layers_size(dir: &Path, layers: &[String]) -> u64 {
    layers
        .iter()
        .filter_map(|l| std::fs::metadata(dir.join(l)).ok())
        .map(|m| m.len())
        .sum()
}

/// QEMU writes the state through `cat`; make it durable before the snapshot
/// counts as a local copy.
fn sync_file(path: &Path) -> anyhow::Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", path.display()))
}

/// [`sync_file`] off the async threads (a RAM image takes a while).
async fn sync_file_async(path: &Path) -> anyhow::Result<()> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || sync_file(&path))
        .await
        .context("sync task")?
}

/// Rename `src` to `dst`; across file systems, copy (sparse) then remove.
pub(super) async fn move_file(src: &Path, dst: &Path) -> anyhow::Result<()> {
    match std::fs::rename(src, dst) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => {
            let part = dst.with_extension("partial");
            let _ = std::fs::remove_file(&part);
            let (s, p) = (src.to_path_buf(), part.clone());
            tokio::task::spawn_blocking(move || hatch_image::copy_sparse_unsynced(&s, &p))
                .await
                .context("copy task")??;
            std::fs::rename(&part, dst).with_context(|| format!("renaming {}", part.display()))?;
            std::fs::remove_file(src).with_context(|| format!("removing {}", src.display()))
        }
        Err(e) => Err(e).with_context(|| format!("moving {} to {}", src.display(), dst.display())),
    }
}
