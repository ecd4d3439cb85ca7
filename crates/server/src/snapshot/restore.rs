//! Restore: make the snapshot's files local and verified (the local copy if
//! its description checks out, else S3 with every chunk verified), give the
//! VM its RAM file and a fresh disk layer, launch QEMU waiting for its
//! state, load it, set the guest's clock and reseed its RNG, run.
//!
//! Ordering rule for a rollback (restore of a running VM): everything that
//! can fail for want of the snapshot (fetch, verification, the RAM copy)
//! happens before the running guest is stopped. Until then a failure leaves
//! the VM running, unchanged.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use hatch_chunks::{ChunkError, ChunkStore, FileChunks};
use hatch_vmm::Machine;

use super::capture::{PREFETCH, blocking, move_file};
use super::local_copy::LocalCopy;
use super::manifest::{Expected, MAX_MANIFEST_BYTES, Manifest, manifest_key};
use super::{SnapshotCorrupt, WakeCause, new_layer_name};
use crate::boot::Launched;
use crate::durable;
use crate::manager::{VmManager, now_rfc3339};
use crate::model::{SnapshotStatus, Vm, VmState};
use crate::state::SnapshotRecord;
use crate::supervisor::{OpGuard, VmSupervisor};

/// Why a restore failed, and whether the VM's running guest was left as it
/// was (a rollback that failed before stopping it).
struct RestoreFailure {
    error: anyhow::Error,
    running_intact: bool,
}

fn intact(error: impl Into<anyhow::Error>) -> RestoreFailure {
    RestoreFailure {
        error: error.into(),
        running_intact: true,
    }
}

fn broken(error: impl Into<anyhow::Error>) -> RestoreFailure {
    RestoreFailure {
        error: error.into(),
        running_intact: false,
    }
}

impl VmManager {
    pub(crate) async fn run_restore(
        self: Arc<Self>,
        rt: Arc<VmSupervisor>,
        guard: OpGuard,
        rec: SnapshotRecord,
        prior: VmState,
        store: Option<Arc<ChunkStore>>,
        cause: WakeCause,
    ) {
        let started = Instant::now();
        rt.take_warnings(); // this restore's own from here on
        match self.restore_from(&rt, &rec, prior, store.as_deref()).await {
            Ok(machine) => {
                if let Err(e) = self.transition(&rt, VmState::Running, None).await {
                    tracing::error!(vm = %rt.id, error = %e, "recording restore failed");
                }
                if let Err(e) = self.store.set_vm_started(&rt.id, &now_rfc3339()).await {
                    tracing::warn!(vm = %rt.id, error = %e, "recording start time failed");
                }
                self.watch(rt.clone(), machine);
                if let Some(snapshot) = self.lazy_ram_snapshot(&rt.id) {
                    self.watch_lazy_fill(rt.clone(), snapshot);
                }
                self.compact_disk_if_long(rt.clone());
                tracing::info!(vm = %rt.id, snapshot = %rec.snap.id,
                    restore_ms = started.elapsed().as_millis() as u64, "restored");
                if prior == VmState::Snapshotted {
                    self.record_wake(&rt.id, cause, &rec.snap.id, None, rt.take_warnings())
                        .await;
                }
            }
            Err(RestoreFailure {
                error: e,
                running_intact,
            }) => {
                let corrupt = e.chain().any(|c| {
                    c.downcast_ref::<ChunkError>()
                        .is_some_and(ChunkError::is_corruption)
                        || c.downcast_ref::<SnapshotCorrupt>().is_some()
                });
                let what = if prior == VmState::Running {
                    "rollback to"
                } else {
                    "restore of"
                };
                let mut reason = format!("{what} {} failed: {e:#}", rec.snap.id);
                if corrupt {
                    reason = format!("snapshot_corrupt: {reason}");
                }
                tracing::error!(vm = %rt.id, %reason);
                if running_intact && prior == VmState::Running {
                    reason.push_str("; the vm runs on unchanged");
                    if let Err(e) = self.transition(&rt, VmState::Running, Some(reason)).await {
                        tracing::error!(vm = %rt.id, error = %e, "recording restore failure failed");
                    }
                    drop(guard);
                    return;
                }
                if let Some(m) = rt.machine() {
                    m.kill();
                    m.wait_exit().await;
                }
                {
                    let mut inner = rt.lock();
                    inner.machine = None;
                    inner.agent = None;
                }
                self.clear_forwards(&rt).await;
                // A standby the wake did not reach would lose its sockets
                // and pid file to the cleanup below.
                self.discard_standby(&rt).await;
                if let Err(e) = self.end_lazy_ram(&rt.id).await {
                    tracing::warn!(vm = %rt.id, error = format!("{e:#}"), "ending the lazy RAM server failed");
                }
                self.remove_lazy_files(&rt.id);
                self.remove_runtime_files(&rt.id);
                // The VM stays as restorable as it was: its snapshots are intact.
                let to = match prior {
                    VmState::Running | VmState::Snapshotted => VmState::Snapshotted,
                    other => other,
                };
                if prior == VmState::Snapshotted {
                    self.record_wake(
                        &rt.id,
                        cause,
                        &rec.snap.id,
                        Some(reason.clone()),
                        rt.take_warnings(),
                    )
                    .await;
                }
                if let Err(e) = self.transition(&rt, to, Some(reason)).await {
                    tracing::error!(vm = %rt.id, error = %e, "recording restore failure failed");
                }
            }
        }
        drop(guard);
    }

    async fn restore_from(
        &self,
        rt: &VmSupervisor,
        rec: &SnapshotRecord,
        prior: VmState,
        store: Option<&ChunkStore>,
    ) -> Result<Arc<Machine>, RestoreFailure> {
        let vm = self
            .get(&rt.id)
            .await
            .map_err(|e| intact(anyhow::anyhow!("{e}")))?;
        let rollback = rt.machine().is_some();
        let dir = self.snapshot_dir(&rec.snap.id);
        let paths = self.paths(&rt.id);

        // 1. The snapshot's files, here and verified. A rolled-back guest
        // runs on meanwhile. The local copy is not evicted while in use.
        let _in_use = self.use_local_copy(&rec.snap.id);
        // A wake of a suspended VM from a snapshot S3 holds takes the RAM
        // image instead of copying it (the guest's RAM file is the image);
        // a rollback, or a snapshot only here, gets a copy.
        let consume = prior == VmState::Snapshotted && rec.snap.status == SnapshotStatus::Ready;
        // Such a wake from S3 starts the guest before its memory is here.
        let lazy = consume && self.lazy_memory_enabled();
        let mut lazy_memory = None;
        let (layers, from_local) = match self.verified_local_copy(rec, &vm).await {
            Ok(layers) => (layers, true),
            Err(why) => {
                // The copy is left as it is (not trusted, not deleted): it
                // may be the only one, and what is wrong may be repaired.
                if rec.local {
                    rt.warn(format!(
                        "the local copy of {} could not be used ({why}); reading S3",
                        rec.snap.id
                    ));
                }
                if rec.snap.status != SnapshotStatus::Ready {
                    return Err(intact(SnapshotCorrupt(format!(
                        "its local copy cannot be used ({why}) and S3 does not hold it"
                    ))));
                }
                let Some(store) = store else {
                    return Err(intact(anyhow::anyhow!(
                        "snapshot storage is unavailable (no S3 configured) and the local copy cannot be used ({why})"
                    )));
                };
                let fetched = self.fetch(rt, rec, &vm, store, !lazy).await;
                let layers = match fetched {
                    Ok((layers, memory)) => {
                        lazy_memory = lazy.then_some(memory);
                        layers
                    }
                    Err(e) if rec.local => {
                        return Err(intact(e.context(format!(
                            "the local copy cannot be used ({why}) and reading S3 failed"
                        ))));
                    }
                    Err(e) => return Err(intact(e)),
                };
                (layers, false)
            }
        };
        let point = if rollback {
            "rollback.fetched"
        } else {
            "restore.prepared"
        };
        self.faults.hit(point, &rt.id).map_err(intact)?;
        if !from_local && !consume {
            self.trust_fetched_copy_when_durable(rec, &layers);
        }
        let ram_copy = if consume {
            None
        } else {
            let (src, part) = (dir.join("mem"), durable::partial(&paths.mem));
            let dst = part.clone();
            tokio::task::spawn_blocking(move || hatch_image::copy_sparse_unsynced(&src, &dst))
                .await
                .context("copy task")
                .map_err(intact)?
                .context("copying the RAM image")
                .map_err(intact)?;
            Some(part)
        };

        // 2. From here on the running guest (if any) is gone: a failure
        // leaves the VM restorable from its snapshots, not running.
        if rollback {
            self.halt(rt).await;
            self.faults.hit("rollback.halted", &rt.id).map_err(broken)?;
        }
        let mut lazy_ram = None;
        match ram_copy {
            Some(part) => std::fs::rename(&part, &paths.mem)
                .context("placing the RAM image")
                .map_err(broken)?,
            None if lazy_memory.is_some() => {
                let (memory, prefetch) =
                    lazy_memory.as_ref().context("no memory").map_err(broken)?;
                lazy_ram = self
                    .place_lazy_ram(rt, &rec.snap.id, memory, prefetch, store)
                    .await
                    .map_err(broken)?;
                self.faults
                    .hit("restore.ram_served", &rt.id)
                    .map_err(broken)?;
            }
            None => {
                let _ = std::fs::remove_file(&paths.mem);
                if rec.local || from_local {
                    let mut taken = rec.clone();
                    taken.local = false;
                    self.save_record(&taken).await;
                }
                move_file(&dir.join("mem"), &paths.mem)
                    .await
                    .map_err(broken)?;
                let _ = std::fs::rename(dir.join(PREFETCH), self.lazy_paths(&rt.id).prefetch);
                self.faults
                    .hit("restore.ram_taken", &rt.id)
                    .map_err(broken)?;
            }
        }
        if from_local {
            self.touch_local_copy(&rec.snap.id).await;
        }

        let started = match &lazy_ram {
            // A corrupt chunk the guest needs would stall it (and the clock
            // sync) for good: the wake fails as an eager one would.
            Some(ram) => tokio::select! {
                started = self.start_from(rt, &rec.snap.id, &dir, &layers, Some(ram)) => started,
                why = self.lazy_ram_corruption(&rt.id) => Err(anyhow::Error::new(SnapshotCorrupt(why))),
            },
            None => self.start_from(rt, &rec.snap.id, &dir, &layers, None).await,
        };
        let never_ran = started
            .as_ref()
            .err()
            .is_some_and(|e| e.downcast_ref::<GuestNeverRan>().is_some());
        if lazy_memory.is_some() {
            // A lazily filled RAM file is never a snapshot's image: the
            // failure path removes it with the server.
        } else if consume && never_ran {
            // Its RAM file is still the snapshot's image: give it back.
            if let Some(m) = rt.machine() {
                m.kill();
                m.wait_exit().await;
            }
            if move_file(&paths.mem, &dir.join("mem")).await.is_ok() && from_local {
                self.save_record(rec).await;
            }
        }
        started.map_err(broken)
    }

    /// The layers of the snapshot's local copy, if it is complete and its
    /// sealed description matches its files (sizes, state hash, ids).
    pub(super) async fn verified_local_copy(
        &self,
        rec: &SnapshotRecord,
        vm: &Vm,
    ) -> Result<Vec<String>, String> {
        if !rec.local {
            return Err("there is no local copy".into());
        }
        let copy = LocalCopy::verify(
            &self.snapshot_dir(&rec.snap.id),
            &self.paths(&vm.id).dir,
            &rec.snap.id,
            &vm.id,
            vm.memory_mib << 20,
            &self.seal_keys,
        )?;
        if copy.kind != rec.snap.kind {
            return Err(format!(
                "the local copy is a {}, the snapshot a {}",
                copy.kind.as_str(),
                rec.snap.kind.as_str()
            ));
        }
        Ok(copy.layer_names())
    }

    async fn touch_local_copy(&self, snapshot_id: &str) {
        if let Ok(Some(mut r)) = self.store.get_snapshot(snapshot_id).await
            && r.local
        {
            r.local_used_at = Some(now_rfc3339());
            self.save_record(&r).await;
        }
    }

    /// Launch QEMU over a new disk layer and load the state of snapshot
    /// `from` (of this VM; a fork's is another's), whose files are in `dir`
    /// (its RAM file is in place), then set the guest's clock.
    pub(super) async fn start_from(
        &self,
        rt: &VmSupervisor,
        from: &str,
        dir: &Path,
        layers: &[String],
        ram: Option<&Path>,
    ) -> anyhow::Result<Arc<Machine>> {
        let paths = self.paths(&rt.id);
        let t0 = Instant::now();
        let prepare = async {
            // A new writable disk layer over the snapshot's frozen ones.
            let top = layers.last().context("snapshot has no disk layer")?;
            let vm = self.get(&rt.id).await?;
            let new_layer = match self.take_next_layer(&rt.id, top, vm.disk_mib) {
                Some(made_ahead) => made_ahead,
                None => {
                    let name = new_layer_name();
                    hatch_vmm::disk::create_overlay(
                        &paths.dir.join(top),
                        "qcow2",
                        &paths.dir.join(&name),
                        vm.disk_mib,
                    )
                    .await?;
                    name
                }
            };
            tracing::debug!(vm = %rt.id, overlay_ms = t0.elapsed().as_millis() as u64, "restore steps");
            let mut all = layers.to_vec();
            all.push(new_layer);
            self.store
                .set_disk_layers(&rt.id, &all, &self.cfg.node_name)
                .await?;
            let launched = self.launch(rt, true, ram).await?;
            if ram.is_some() {
                // The server ends by itself once this QEMU is gone, whoever
                // ends it (a daemon killed meanwhile included).
                self.watch_lazy_ram(&rt.id, launched.machine.pid().unsigned_abs())
                    .await?;
            }
            self.faults.hit("restore.launched", &rt.id)?;
            anyhow::Ok(launched)
        };
        let Launched { machine, warm } = prepare.await.context(GuestNeverRan)?;
        // The agent channel is connected before the guest resumes, so that
        // the guest agent, which comes back blocked reading its port, never
        // finds it without a host (it would read end-of-file and wait
        // 250 ms before looking again).
        let early = hatch_vmm::agent::Agent::connect(&paths.agent_socket)
            .await
            .ok();
        rt.lock().agent = early;
        let t_launch = t0.elapsed();
        if warm {
            // The state is in it already: it only runs on (its disk becomes
            // active with `cont`). Not a `GuestNeverRan` if that fails: the
            // agent's connect above has reached guest memory already, so
            // the image is no longer the snapshot's; S3 has the snapshot
            // (a wake only takes the image of one that is ready there).
            machine
                .resume()
                .await
                .context("letting the warm standby QEMU run")?;
        } else {
            match machine.load_state(&dir.join("state")).await {
                Ok(()) => {}
                Err(e @ hatch_vmm::VmmError::StateRejected(_)) => {
                    return Err(anyhow::Error::new(e).context(GuestNeverRan));
                }
                Err(e) => {
                    return Err(
                        anyhow::Error::new(e).context("loading the saved CPU and device state")
                    );
                }
            }
        }
        self.faults.hit("restore.state_loaded", &rt.id)?;
        let t_load = t0.elapsed();
        // The guest's clock stood still since the capture and its RNG state
        // is shared with every other restore of this snapshot: both are put
        // right before anyone talks to it, or the restore fails.
        self.sync_guest_clock(rt, Some(from)).await?;
        let ms = |d: std::time::Duration| d.as_millis() as u64;
        tracing::debug!(vm = %rt.id, launch_done_ms = ms(t_launch),
            state_loaded_ms = ms(t_load), agent_done_ms = ms(t0.elapsed()), "restore steps");
        Ok(machine)
    }

    /// Fetched state and memory are written without fsync (the restore does
    /// not wait for the disk); once they are durable, in the background,
    /// the copy is described and trusted for the next restore.
    pub(super) fn trust_fetched_copy_when_durable(&self, rec: &SnapshotRecord, layers: &[String]) {
        let dir = self.snapshot_dir(&rec.snap.id);
        let vm_dir = self.paths(&rec.snap.vm_id).dir;
        let store = self.store.clone();
        let keys = self.seal_keys.clone();
        let (id, vm_id, kind, layers) = (
            rec.snap.id.clone(),
            rec.snap.vm_id.clone(),
            rec.snap.kind,
            layers.to_vec(),
        );
        tokio::spawn(async move {
            let described = {
                let (id, layers) = (id.clone(), layers.clone());
                tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                    durable::sync_file(&dir.join("mem"))?;
                    durable::sync_file(&dir.join("state"))?;
                    durable::sync_dir(&dir)?;
                    LocalCopy::describe(&dir, &vm_dir, &id, &vm_id, kind, &layers)?
                        .write(&dir, &keys)?;
                    Ok(())
                })
                .await
                .map_err(anyhow::Error::from)
                .and_then(|described| described)
            };
            if let Err(e) = described {
                tracing::warn!(snapshot = %id, error = %e, "the fetched copy is not kept");
                return;
            }
            if let Ok(Some(mut rec)) = store.get_snapshot(&id).await {
                rec.local = true;
                rec.local_used_at = Some(now_rfc3339());
                rec.layers = layers;
                if let Err(e) = store.save_snapshot(&rec).await {
                    tracing::warn!(snapshot = %id, error = %e, "recording local copy failed");
                }
            }
        });
    }

    /// Download a snapshot from S3: the manifest (authenticated and checked
    /// against the VM before anything is written), state and memory into
    /// the snapshot's local directory, missing disk layers into the VM's
    /// directory, each rebased onto this host's paths. Returns the layers.
    pub(super) async fn fetch(
        &self,
        rt: &VmSupervisor,
        rec: &SnapshotRecord,
        vm: &Vm,
        store: &ChunkStore,
        with_memory: bool,
    ) -> anyhow::Result<(Vec<String>, (FileChunks, Vec<u32>))> {
        let started = Instant::now();
        let bytes = store
            .get(&manifest_key(&rt.id, &rec.snap.id), MAX_MANIFEST_BYTES)
            .await
            .context("reading the snapshot manifest")?;
        let expected = Expected {
            vm_id: &vm.id,
            snapshot_id: &rec.snap.id,
            image: &vm.image,
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            disk_mib: vm.disk_mib,
            cpu_model: &self.cpu_model,
            host_cpu: &self.cpu_signature,
        };
        let manifest = Manifest::decode(&bytes, &self.seal_keys, &expected)
            .map_err(|e| SnapshotCorrupt(format!("manifest of {}: {e}", rec.snap.id)))?;
        // State and memory land in the snapshot's local directory as a
        // cache, unsynced: the record is not marked local, so after a crash
        // they are fetched again rather than trusted.
        let dir = self.snapshot_dir(&rec.snap.id);
        let tmp = durable::partial(&dir);
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        let state_and_memory = async {
            let state = store
                .download_file(&manifest.device_state, &tmp.join("state"))
                .await?;
            let mem = if with_memory {
                store
                    .download_file(&manifest.memory, &tmp.join("mem"))
                    .await?
                    .fetched_bytes
            } else {
                0
            };
            anyhow::Ok(state.fetched_bytes + mem)
        };
        // Disk layers come down at the same time as memory.
        let (a, b) = tokio::try_join!(
            state_and_memory,
            self.fetch_layers(&rt.id, &manifest, store)
        )?;
        let fetched = a + b;
        self.faults.hit("fetch.downloaded", &rt.id)?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir)?;
        tracing::info!(vm = %rt.id, snapshot = %rec.snap.id, fetched_bytes = fetched,
            ms = started.elapsed().as_millis() as u64, "fetched snapshot from S3");
        if started.elapsed() > SLOW_FETCH {
            rt.warn(format!(
                "slow fetch from S3: {} MiB in {:.1} s",
                fetched >> 20,
                started.elapsed().as_secs_f64()
            ));
        }
        let layers = manifest.disk_layers.into_iter().map(|l| l.name).collect();
        Ok((layers, (manifest.memory, manifest.prefetch)))
    }

    /// The RAM of a wake from S3, served lazily; returns the file QEMU maps.
    /// Where that cannot be (no FUSE here), the image is downloaded whole
    /// into the VM's RAM file instead, and the wake says so.
    async fn place_lazy_ram(
        &self,
        rt: &VmSupervisor,
        snapshot_id: &str,
        memory: &FileChunks,
        prefetch: &[u32],
        store: Option<&ChunkStore>,
    ) -> anyhow::Result<Option<std::path::PathBuf>> {
        match self
            .serve_ram_lazily(&rt.id, snapshot_id, memory, prefetch)
            .await
        {
            Ok(ram) => Ok(Some(ram)),
            Err(e) => {
                let _ = self.end_lazy_ram(&rt.id).await;
                self.remove_lazy_files(&rt.id);
                rt.warn(format!(
                    "memory could not be served lazily ({e:#}); downloading all of it"
                ));
                let store = store.context("snapshot storage is unavailable")?;
                store
                    .download_file(memory, &self.paths(&rt.id).mem)
                    .await
                    .context("downloading the memory image")?;
                Ok(None)
            }
        }
    }

    /// Download the disk layers this host lacks into the VM's directory,
    /// each rebased onto this host's paths (all at once: a rebase only
    /// rewrites the header, it does not need the backing file yet), and make
    /// them durable before they join the VM's disk chain. Layer names were
    /// validated with the manifest. Returns the bytes fetched.
    async fn fetch_layers(
        &self,
        vm_id: &str,
        manifest: &Manifest,
        store: &ChunkStore,
    ) -> anyhow::Result<u64> {
        let image = self.image(&manifest.image).await?;
        let vm_dir = self.paths(vm_id).dir;
        let mut backing = (image.disk.clone(), image.disk_format.clone());
        let mut missing = Vec::new();
        for layer in &manifest.disk_layers {
            let path = vm_dir.join(&layer.name);
            if !path.exists() {
                missing.push((layer, path.clone(), backing.clone()));
            }
            backing = (path, "qcow2".to_string());
        }
        let fetched = futures_util::future::try_join_all(missing.into_iter().map(
            |(layer, path, (backing, backing_format))| async move {
                let part = durable::partial(&path);
                let report = store.download_file(&layer.chunks, &part).await?;
                hatch_vmm::disk::rebase_unsafe(&part, &backing, &backing_format).await?;
                let (p, f) = (part.clone(), path.clone());
                blocking(move || durable::commit(&p, &f)).await?;
                anyhow::Ok(report.fetched_bytes)
            },
        ))
        .await?;
        Ok(fetched.iter().sum())
    }
}

/// A fetch from S3 slower than this is a degradation the wake's event shows.
const SLOW_FETCH: std::time::Duration = std::time::Duration::from_secs(5);

/// Marks a restore that failed before the guest ran (its RAM file is
/// untouched).
#[derive(Debug)]
struct GuestNeverRan;

impl std::fmt::Display for GuestNeverRan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("restore stopped before the guest ran")
    }
}
