//! Capture: freeze what must be frozen while the guest is paused, let it go
//! (checkpoint) or end it (suspend). The upload happens afterwards, in the
//! storage worker (`uploads.rs`).
//!
//! Every file of a capture is written under a `.partial` name and renamed
//! once complete and synced; `local.json`, written last, describes the
//! whole copy. Fault points (`fault.rs`) sit between the steps; the crash
//! test kills the daemon at each one.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use hatch_chunks::ChunkStore;
use hatch_vmm::Machine;

use super::local_copy::LocalCopy;
use super::manifest::{Layer, MANIFEST_VERSION, Manifest, manifest_key};
use super::{SnapshotCorrupt, new_layer_name, node_name};
use crate::durable;
use crate::manager::{VmManager, now_rfc3339};
use crate::model::{SnapshotKind, SnapshotStatus, Vm, VmState};
use crate::state::SnapshotRecord;
use crate::supervisor::{OpGuard, VmSupervisor};

impl VmManager {
    pub(super) async fn run_snapshot(
        self: Arc<Self>,
        rt: Arc<VmSupervisor>,
        guard: OpGuard,
        mut rec: SnapshotRecord,
    ) {
        rec.snap.status = SnapshotStatus::Capturing;
        self.save_record(&rec).await;
        let stop = rec.snap.kind == SnapshotKind::Suspend;
        let captured = if stop {
            self.capture_suspend(&rt, &mut rec).await
        } else {
            self.capture_checkpoint(&rt, &mut rec).await
        };
        if let Err(e) = captured {
            // A suspend that failed after QEMU ended has its state saved and
            // its RAM on disk: finish it as a restart would.
            let gone = !rt.machine().is_some_and(|m| m.is_alive());
            if stop && gone && matches!(self.complete_interrupted_capture(&rt.id).await, Ok(true)) {
                tracing::warn!(vm = %rt.id, snapshot = %rec.snap.id, error = format!("{e:#}"),
                    "a suspend step failed after QEMU ended; the capture was completed");
                let _ = self.transition(&rt, VmState::Snapshotted, None).await;
                rt.release_idle();
                drop(guard);
                self.uploads.kick();
                return;
            }
            if stop && gone && self.snapshot_dir(&rec.snap.id).join("state").exists() {
                // Past the point of no return: the saved state and the RAM
                // image are the VM's only state. Nothing is deleted; the
                // suspend is completed at the next start.
                let reason = format!(
                    "the suspend could not be completed ({e:#}); its saved state is kept and completing it is retried when the daemon starts"
                );
                tracing::error!(vm = %rt.id, snapshot = %rec.snap.id, %reason);
                rec.snap.error = Some(reason.clone());
                self.save_record(&rec).await;
                {
                    let mut inner = rt.lock();
                    inner.machine = None;
                    inner.agent = None;
                }
                self.clear_forwards(&rt).await;
                let _ = self.transition(&rt, VmState::Failed, Some(reason)).await;
                rt.release_idle();
                return;
            }
            let reason = format!("capture failed: {e:#}");
            tracing::error!(vm = %rt.id, snapshot = %rec.snap.id, %reason);
            rec.snap.status = SnapshotStatus::Failed;
            rec.snap.error = Some(reason.clone());
            self.save_record(&rec).await;
            let _ = std::fs::remove_dir_all(self.snapshot_dir(&rec.snap.id));
            // The guest was resumed (or never paused) if its QEMU lives; a
            // QEMU that hung was killed.
            let alive = rt.machine().is_some_and(|m| m.is_alive());
            if alive {
                let _ = self.transition(&rt, VmState::Running, Some(reason)).await;
            } else {
                self.halt(&rt).await;
                let _ = self.transition(&rt, VmState::Failed, Some(reason)).await;
            }
            rt.release_idle();
            if rec.snap.trigger == "idle" {
                self.record_idle_suspend(&rt.id, &rec.snap.id, None, rec.snap.error.clone())
                    .await;
            }
            return;
        }
        rec.local = true;
        rec.local_used_at = Some(now_rfc3339());
        rec.snap.status = SnapshotStatus::Uploading;
        self.save_record(&rec).await;
        let _ = self
            .faults
            .hit(&format!("{}.recorded", rec.snap.kind.as_str()), &rt.id);
        let to = if stop {
            VmState::Snapshotted
        } else {
            VmState::Running
        };
        if let Err(e) = self.transition(&rt, to, None).await {
            tracing::error!(vm = %rt.id, error = %e, "recording snapshot state failed");
        }
        rt.release_idle();
        if rec.snap.trigger == "idle" {
            self.record_idle_suspend(&rt.id, &rec.snap.id, rec.snap.pause_ms, None)
                .await;
        }
        // The VM is free for other operations while the upload runs.
        drop(guard);
        tracing::info!(vm = %rt.id, snapshot = %rec.snap.id, kind = rec.snap.kind.as_str(),
            pause_ms = rec.snap.pause_ms, "captured");
        self.uploads.kick();
        self.enforce_local_budget_soon().await;
    }

    pub(crate) async fn save_record(&self, rec: &SnapshotRecord) {
        // A snapshot deleted meanwhile (with its VM) is not brought back.
        if !matches!(self.store.get_snapshot(&rec.snap.id).await, Ok(Some(_))) {
            return;
        }
        if let Err(e) = self.store.save_snapshot(rec).await {
            tracing::error!(snapshot = %rec.snap.id, error = %e, "recording snapshot failed");
        }
    }

    /// Suspend: pause, save device state, end QEMU (or keep it, paused, as
    /// the VM's warm standby); keep RAM and disk locally.
    async fn capture_suspend(
        &self,
        rt: &VmSupervisor,
        rec: &mut SnapshotRecord,
    ) -> anyhow::Result<()> {
        let machine = rt.machine().context("vm has no running QEMU")?;
        let dir = self.snapshot_dir(&rec.snap.id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Memory still arriving from S3 arrives first, the guest running.
        self.await_lazy_ram_complete(&rt.id).await?;
        // Kept warm: its disk switches, in the pause, to the layer the next
        // wake writes to (after the state is saved its block devices are
        // inactive and a switch would fail).
        let warm_switch = self.warm_switch(rt).await;
        let vm_dir = self.paths(&rt.id).dir;
        let t0 = Instant::now();
        machine.pause().await?;
        // `state` appears only once complete: recovery treats its presence as
        // "the device state is saved".
        let part = durable::partial(&dir.join("state"));
        let mut switched = false;
        let saved = async {
            self.faults.hit("suspend.paused", &rt.id)?;
            if let Some(w) = &warm_switch {
                // Nothing may reach the kept QEMU's devices once the state
                // is saved: a message on the agent's channel (or its close,
                // should the daemon die) would land in guest memory, which
                // is then the snapshot's. So the channel closes now, and
                // QEMU tells the guest before the state is saved; the wake
                // connects again before the guest runs.
                let agent = {
                    // A connect in progress ends first; later ones see the
                    // VM is not running and do not connect.
                    let _connecting = rt.agent_connect.lock().await;
                    rt.lock().agent.take()
                };
                if let Some(agent) = agent {
                    agent.close();
                }
                machine
                    .await_agent_disconnected(AGENT_CLOSE_TIMEOUT)
                    .await?;
                machine
                    .freeze_disk(
                        &node_name(&w.top),
                        &vm_dir.join(&w.next),
                        &node_name(&w.next),
                    )
                    .await?;
                switched = true;
                self.faults.hit("suspend.disk_switched", &rt.id)?;
            }
            machine.save_state(&part).await?;
            // Renamed now (complete), made durable with the RAM image once
            // QEMU has ended: an fsync here would lengthen the pause, and
            // before that the RAM image is not durable either.
            std::fs::rename(&part, dir.join("state"))
                .with_context(|| format!("keeping {}", part.display()))?;
            self.faults.hit("suspend.state_saved", &rt.id)?;
            anyhow::Ok(())
        };
        if let Err(e) = saved.await {
            resume_guest(&machine).await;
            if let Some(w) = &warm_switch {
                self.record_chain_after_failed_switch(&rt.id, &machine, &w.top, &w.next, switched)
                    .await;
            }
            return Err(e);
        }
        rt.note_net_at_capture(&rec.snap.id);
        // Past this point the guest never runs again in this QEMU unless a
        // wake takes it as it is: quitting, or saving the state (which
        // inactivates its block devices), flushed the active disk layer,
        // which is frozen.
        rec.snap.pause_ms = Some(t0.elapsed().as_millis() as u64);
        self.metrics
            .record_vm_pause(&rt.id, t0.elapsed().as_millis() as u64);
        let warm = match warm_switch.clone() {
            Some(w) => Some(self.detach_warm(rt, machine, w, &rec.snap.id).await),
            None => {
                self.halt_keeping_ram(rt, &machine).await;
                None
            }
        };
        let kept = async {
            self.faults.hit("suspend.qemu_ended", &rt.id)?;
            rec.layers = self.store.disk_layers(&rt.id).await?;
            rec.snap.disk_bytes = layers_size(&vm_dir, &rec.layers);
            self.keep_ram(&rt.id, &rec.snap.id, warm.is_none()).await?;
            self.faults.hit("suspend.ram_kept", &rt.id)?;
            self.describe_local_copy(rec).await?;
            // The next wake's disk layer, made now rather than then (or
            // switched to in the pause).
            if let Some(top) = rec.layers.last() {
                let disk_mib = self.get(&rt.id).await?.disk_mib;
                let made = match &warm_switch {
                    Some(w) => self.record_next_layer(&rt.id, &w.next, top, disk_mib),
                    None => self.prepare_next_layer(&rt.id, top, disk_mib).await,
                };
                if let Err(e) = made {
                    tracing::warn!(vm = %rt.id, error = format!("{e:#}"), "making the next disk layer ahead failed");
                }
            }
            anyhow::Ok(())
        }
        .await;
        match (kept, warm) {
            (Ok(()), Some(warm)) => {
                self.keep_warm(rt, warm).await;
                Ok(())
            }
            (Ok(()), None) => Ok(()),
            (Err(e), warm) => {
                // The capture fails as if QEMU had ended (it does now).
                if let Some(warm) = warm {
                    warm.discard().await;
                }
                Err(e)
            }
        }
    }

    /// A capture failed in its pause after it may have switched the disk
    /// from layer `top` to `next`, and the guest runs on: the disk chain it
    /// writes to now is recorded, lest a later boot write into a layer
    /// snapshots hold. A switch known to be made is recorded without asking
    /// QEMU; one that may or may not have been is read back from it.
    async fn record_chain_after_failed_switch(
        &self,
        vm_id: &str,
        machine: &Machine,
        top: &str,
        next: &str,
        switched: bool,
    ) {
        let recorded = async {
            if switched {
                let mut layers = self.store.disk_layers(vm_id).await?;
                match layers.last().map(String::as_str) {
                    Some(last) if last == next => return Ok(()),
                    Some(last) if last == top => {
                        layers.push(next.to_string());
                        self.store
                            .set_disk_layers(vm_id, &layers, &self.cfg.node_name)
                            .await?;
                        return Ok(());
                    }
                    // Not the chain the switch was made on: QEMU knows.
                    _ => {}
                }
            }
            self.reconcile_disk_chain(vm_id, machine).await
        };
        if let Err(e) = recorded.await {
            tracing::error!(vm = %vm_id, error = format!("{e:#}"),
                "cannot record the disk chain after a failed capture");
        }
    }

    /// Write `local.json` for a capture whose files are all in place: the
    /// last step of every capture.
    async fn describe_local_copy(&self, rec: &SnapshotRecord) -> anyhow::Result<()> {
        let dir = self.snapshot_dir(&rec.snap.id);
        let vm_dir = self.paths(&rec.snap.vm_id).dir;
        let (id, vm, kind, layers) = (
            rec.snap.id.clone(),
            rec.snap.vm_id.clone(),
            rec.snap.kind,
            rec.layers.clone(),
        );
        let keys = self.seal_keys.clone();
        tokio::task::spawn_blocking(move || {
            LocalCopy::describe(&dir, &vm_dir, &id, &vm, kind, &layers)?.write(&dir, &keys)
        })
        .await
        .context("describe task")?
        .context("writing the local copy's description")
    }

    /// Move a suspended VM's RAM file into the snapshot as `mem`: a rename
    /// (both live in the data dir), an fsync of the file and then of the
    /// directory, so `mem` is whole and durable once the capture counts.
    async fn keep_ram(
        &self,
        vm_id: &str,
        snapshot_id: &str,
        remove_runtime_files: bool,
    ) -> anyhow::Result<()> {
        let touched = self.take_lazy_ram(vm_id).await?;
        self.keep_taken_ram(vm_id, snapshot_id, touched, remove_runtime_files)
            .await
    }

    /// [`Self::keep_ram`] once the RAM file is taken from its lazy server
    /// (if it had one), with the chunks its guest asked for.
    async fn keep_taken_ram(
        &self,
        vm_id: &str,
        snapshot_id: &str,
        touched: Option<Vec<u32>>,
        remove_runtime_files: bool,
    ) -> anyhow::Result<()> {
        let dir = self.snapshot_dir(snapshot_id);
        let dst = dir.join("mem");
        // What the guest asked for first after this wake (a lazy one), or
        // the list the wake's snapshot had: the next lazy wake's prefetch.
        match touched {
            Some(touched) if !touched.is_empty() => {
                std::fs::write(dir.join(PREFETCH), serde_json::to_vec(&touched)?)
                    .context("keeping the prefetch list")?;
            }
            _ => {
                let _ = std::fs::rename(self.lazy_paths(vm_id).prefetch, dir.join(PREFETCH));
            }
        }
        move_file(&self.paths(vm_id).mem, &dst).await?;
        // A QEMU kept warm still uses its sockets and pid file.
        if remove_runtime_files {
            self.remove_runtime_files(vm_id);
        }
        blocking(move || {
            durable::sync_file(&dst)?;
            durable::sync_file(&dir.join("state"))?;
            durable::sync_dir(&dir)
        })
        .await
    }

    /// After a restart: a *suspend* that had saved the device state and
    /// ended QEMU but was not recorded as captured is finished now. Only a
    /// suspend: its RAM file stopped changing when the state was saved. A
    /// checkpoint's guest ran on, so its live RAM and disk are newer than
    /// its saved state and are never taken for its memory image. Returns
    /// whether the VM has a complete local snapshot afterwards.
    pub(crate) async fn complete_interrupted_capture(&self, vm_id: &str) -> anyhow::Result<bool> {
        self.faults.hit("suspend.complete", vm_id)?;
        for mut rec in self.store.list_snapshots(vm_id).await? {
            if rec.snap.status != SnapshotStatus::Capturing
                || rec.snap.kind != SnapshotKind::Suspend
            {
                continue;
            }
            let dir = self.snapshot_dir(&rec.snap.id);
            let ram_kept = dir.join("mem").exists();
            let ram_live = self.paths(vm_id).mem.exists();
            if !dir.join("state").exists() || !(ram_kept || ram_live) {
                continue;
            }
            let touched = if ram_kept {
                None
            } else {
                match self.take_lazy_ram(vm_id).await {
                    Ok(touched) => touched,
                    Err(e) => {
                        // Its guest's writes may not all be in the RAM file:
                        // it is no memory image. The VM's earlier snapshots
                        // remain.
                        tracing::error!(vm = %vm_id, snapshot = %rec.snap.id, error = format!("{e:#}"),
                            "an interrupted suspend cannot be completed");
                        continue;
                    }
                }
            };
            if ram_kept {
                let d = dir.clone();
                blocking(move || {
                    durable::sync_file(&d.join("mem"))?;
                    durable::sync_file(&d.join("state"))?;
                    durable::sync_dir(&d)
                })
                .await?;
            } else {
                self.keep_taken_ram(vm_id, &rec.snap.id, touched, true)
                    .await?;
            }
            rec.layers = self.store.disk_layers(vm_id).await?;
            rec.snap.disk_bytes = layers_size(&self.paths(vm_id).dir, &rec.layers);
            self.describe_local_copy(&rec).await?;
            rec.local = true;
            rec.local_used_at = Some(now_rfc3339());
            // Uploading: the storage worker uploads it.
            rec.snap.status = SnapshotStatus::Uploading;
            self.save_record(&rec).await;
            tracing::info!(vm = %vm_id, snapshot = %rec.snap.id, "finished an interrupted suspend");
            return Ok(true);
        }
        Ok(false)
    }

    /// Checkpoint: while paused, switch the disk to a new layer, save device
    /// state and copy RAM; then let the guest run on.
    async fn capture_checkpoint(
        &self,
        rt: &VmSupervisor,
        rec: &mut SnapshotRecord,
    ) -> anyhow::Result<()> {
        let machine = rt.machine().context("vm has no running QEMU")?;
        let dir = self.snapshot_dir(&rec.snap.id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let paths = self.paths(&rt.id);
        let layers = self.store.disk_layers(&rt.id).await?;
        let top = layers.last().context("vm has no disk layer")?.clone();
        let new_layer = new_layer_name();
        // The copy taken while paused goes to tmpfs when it fits: writing
        // hundreds of MiB into a disk file's page cache can stall on
        // dirty-page throttling. Otherwise straight into the snapshot.
        let vm_mib = self.get(&rt.id).await?.memory_mib;
        let fits =
            hatch_vmm::host::fs_free_mib(&self.cfg.run_dir).is_some_and(|free| free > vm_mib + 256);
        let mem_part = durable::partial(&dir.join("mem"));
        let ram_copy = if fits {
            self.cfg.run_dir.join(format!("{}.mem", rec.snap.id))
        } else {
            mem_part.clone()
        };

        self.await_lazy_ram_complete(&rt.id).await?;
        // What the copy needs besides the bytes is done while the guest
        // still runs: its space allocated (on tmpfs that costs more than
        // the copy) and the RAM file mapped, its pages' mappings made.
        let prepared = {
            let (src, dst) = (paths.mem.clone(), ram_copy.clone());
            let _ = std::fs::remove_file(&dst);
            let made =
                tokio::task::spawn_blocking(move || hatch_image::PreparedCopy::prepare(&src, &dst))
                    .await
                    .map_err(anyhow::Error::from)
                    .and_then(|r| r.map_err(anyhow::Error::from));
            match made {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::warn!(vm = %rt.id, error = %e, "the RAM copy was not prepared ahead");
                    None
                }
            }
        };
        let preallocated = prepared.is_some();
        let t0 = Instant::now();
        if let Err(e) = machine.pause().await {
            let _ = std::fs::remove_file(&ram_copy);
            return Err(e.into());
        }
        let mut switched = false;
        let result: anyhow::Result<()> = async {
            self.faults.hit("checkpoint.paused", &rt.id)?;
            // Order matters: freeze the disk layer before saving state. Once
            // the state is saved QEMU has inactivated its block devices until
            // `cont`, and a layer switch would fail. (A crash between the
            // switch and the record below is repaired at start-up, which
            // takes the chain from QEMU.)
            machine
                .freeze_disk(
                    &node_name(&top),
                    &paths.dir.join(&new_layer),
                    &node_name(&new_layer),
                )
                .await?;
            switched = true;
            let t_frozen = t0.elapsed();
            self.faults.hit("checkpoint.layer_switched", &rt.id)?;
            let mut all = layers.clone();
            all.push(new_layer.clone());
            self.store
                .set_disk_layers(&rt.id, &all, &self.cfg.node_name)
                .await?;
            self.faults.hit("checkpoint.disk_frozen", &rt.id)?;
            let state_part = durable::partial(&dir.join("state"));
            machine.save_state(&state_part).await?;
            rt.note_net_at_capture(&rec.snap.id);
            self.faults.hit("checkpoint.state_saved", &rt.id)?;
            let t_saved = t0.elapsed();
            // A lazily served RAM file holds the guest's writes once synced.
            self.sync_lazy_ram(&rt.id).await?;
            // RAM must be copied before the guest changes it again (from
            // the mapping prepared above); moving it to disk and making it
            // durable waits until the guest runs again.
            let (src, dst) = (paths.mem.clone(), ram_copy.clone());
            tokio::task::spawn_blocking(move || match prepared {
                Some(p) => p.finish(),
                None => {
                    let _ = std::fs::remove_file(&dst);
                    hatch_image::copy_sparse_unsynced(&src, &dst)
                }
            })
            .await
            .context("copy task")??;
            let ms = |d: std::time::Duration| d.as_millis() as u64;
            tracing::debug!(vm = %rt.id, preallocated, disk_frozen_ms = ms(t_frozen),
                state_saved_ms = ms(t_saved), ram_copied_ms = ms(t0.elapsed()), "checkpoint steps");
            self.faults.hit("checkpoint.ram_copied", &rt.id)?;
            Ok(())
        }
        .await;
        resume_guest(&machine).await;
        rec.snap.pause_ms = Some(t0.elapsed().as_millis() as u64);
        self.metrics
            .record_vm_pause(&rt.id, t0.elapsed().as_millis() as u64);
        if result.is_err() {
            self.record_chain_after_failed_switch(&rt.id, &machine, &top, &new_layer, switched)
                .await;
        }
        let stored = match result {
            Ok(()) => {
                async {
                    self.faults.hit("checkpoint.resumed", &rt.id)?;
                    if ram_copy != mem_part {
                        move_file(&ram_copy, &mem_part).await?;
                    }
                    let d = dir.clone();
                    blocking(move || {
                        durable::commit(&durable::partial(&d.join("state")), &d.join("state"))?;
                        durable::commit(&durable::partial(&d.join("mem")), &d.join("mem"))
                    })
                    .await
                }
                .await
            }
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_file(&ram_copy);
        stored?;
        self.faults.hit("checkpoint.files_committed", &rt.id)?;
        rec.layers = layers;
        rec.snap.disk_bytes = layers_size(&paths.dir, &rec.layers);
        self.describe_local_copy(rec).await
    }

    /// Quit QEMU but keep the RAM file (it is the memory image).
    async fn halt_keeping_ram(&self, rt: &VmSupervisor, machine: &Machine) {
        if let Err(e) = machine.quit().await {
            tracing::warn!(vm = %rt.id, error = %e, "quit failed; killing QEMU");
            machine.kill();
            machine.wait_exit().await;
        }
        {
            let mut inner = rt.lock();
            inner.machine = None;
            inner.agent = None;
        }
        self.clear_forwards(rt).await;
    }

    /// Upload state, memory and disk layers, then the manifest (the commit
    /// point), under the bucket's upload lock. Returns the bytes newly
    /// stored.
    pub(super) async fn upload(
        &self,
        rec: &SnapshotRecord,
        store: &ChunkStore,
        vm: &Vm,
    ) -> anyhow::Result<u64> {
        // Shared with other uploads; garbage collection waits for it, in
        // this daemon and (through the bucket lock) in every other.
        let _gc = self.gc_lock.read().await;
        let dir = self.snapshot_dir(&rec.snap.id);
        let vm_dir = self.paths(&vm.id).dir;
        // What is sealed into the manifest must be what was captured: the
        // files are checked against their sealed description first.
        let copy = LocalCopy::verify(
            &dir,
            &vm_dir,
            &rec.snap.id,
            &vm.id,
            vm.memory_mib << 20,
            &self.seal_keys,
        )
        .map_err(|why| SnapshotCorrupt(format!("the local copy to upload: {why}")))?;
        anyhow::ensure!(
            copy.layer_names() == rec.layers && copy.kind == rec.snap.kind,
            SnapshotCorrupt("the local copy does not describe this snapshot".into())
        );
        let lock = store.lock_for_upload(&self.owner).await?;
        let mut stored = 0;
        let (device_state, r) = store.upload_file(&dir.join("state")).await?;
        stored += r.stored_bytes;
        let (memory, r) = store.upload_file(&dir.join("mem")).await?;
        stored += r.stored_bytes;
        let prefetch = read_prefetch(&dir, memory.chunks.len());
        let mut disk_layers = Vec::new();
        for name in &rec.layers {
            let (chunks, r) = store.upload_file(&vm_dir.join(name)).await?;
            stored += r.stored_bytes;
            disk_layers.push(Layer {
                name: name.clone(),
                chunks,
            });
        }
        self.faults.hit("upload.before_manifest", &vm.id)?;
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            snapshot_id: rec.snap.id.clone(),
            vm_id: vm.id.clone(),
            kind: rec.snap.kind,
            created_at: rec.snap.created_at.clone(),
            image: vm.image.clone(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            disk_mib: vm.disk_mib,
            qemu_version: self.qemu_version.clone(),
            cpu_model: self.cpu_model.clone(),
            host_cpu: self.cpu_signature.clone(),
            device_state,
            memory,
            prefetch,
            disk_layers,
        };
        let bytes = manifest
            .encode(&self.seal_keys)
            .context("encoding manifest")?;
        stored += bytes.len() as u64;
        // Chunks found stored were skipped on the strength of the lock; if
        // it could not be kept fresh, a collection may have run meanwhile.
        lock.check_held()?;
        store
            .put(&manifest_key(&vm.id, &rec.snap.id), Bytes::from(bytes))
            .await?;
        lock.release().await;
        self.faults.hit("upload.manifest_written", &vm.id)?;
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

/// A snapshot's prefetch list (`snapshot/lazy.rs`), next to its memory.
pub(super) const PREFETCH: &str = "prefetch.json";

/// Longest a suspend that keeps its QEMU waits, paused, for QEMU to see the
/// agent's channel close (it takes a main-loop turn, well under 1 ms).
const AGENT_CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The prefetch list kept with a capture: chunk numbers below `chunks`,
/// or none if it is missing or unreadable (it only orders a fetch).
pub(super) fn read_prefetch(dir: &Path, chunks: usize) -> Vec<u32> {
    let Ok(bytes) = std::fs::read(dir.join(PREFETCH)) else {
        return Vec::new();
    };
    let list: Vec<u32> = serde_json::from_slice(&bytes).unwrap_or_default();
    let mut seen = vec![false; chunks];
    list.into_iter()
        .filter(|&i| (i as usize) < chunks && !std::mem::replace(&mut seen[i as usize], true))
        .collect()
}

pub(super) fn layers_size(dir: &Path, layers: &[String]) -> u64 {
    layers
        .iter()
        .filter_map(|l| std::fs::metadata(dir.join(l)).ok())
        .map(|m| m.len())
        .sum()
}

/// Run blocking file work off the async threads.
pub(super) async fn blocking(
    f: impl FnOnce() -> std::io::Result<()> + Send + 'static,
) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(f)
        .await
        .context("file task")?
        .context("syncing files")
}

/// Rename `src` to `dst`; across file systems, copy (sparse) then remove.
pub(super) async fn move_file(src: &Path, dst: &Path) -> anyhow::Result<()> {
    match std::fs::rename(src, dst) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => {
            let part = durable::partial(dst);
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
