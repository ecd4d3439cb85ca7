//! Restore: bring the snapshot's files here (local copy, else S3 with every
//! chunk verified), give the VM a fresh RAM file and disk layer, launch QEMU
//! waiting for its state, load it, run.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use hatch_chunks::{ChunkError, ChunkStore};
use hatch_vmm::Machine;

use super::capture::move_file;
use super::manifest::{Manifest, manifest_key};
use super::{WakeCause, new_layer_name};
use crate::db::SnapshotRecord;
use crate::manager::{VmManager, now_rfc3339};
use crate::model::{SnapshotStatus, VmState};
use crate::runtime::{OpGuard, VmRuntime};

impl VmManager {
    pub(crate) async fn run_restore(
        self: Arc<Self>,
        rt: Arc<VmRuntime>,
        guard: OpGuard,
        rec: SnapshotRecord,
        prior: VmState,
        store: Arc<ChunkStore>,
        cause: WakeCause,
    ) {
        let started = Instant::now();
        match self.restore_from(&rt, &rec, prior, &store).await {
            Ok(machine) => {
                if let Err(e) = self.transition(&rt, VmState::Running, None) {
                    tracing::error!(vm = %rt.id, error = %e, "recording restore failed");
                }
                if let Err(e) = self.db.set_vm_started(&rt.id, &now_rfc3339()) {
                    tracing::warn!(vm = %rt.id, error = %e, "recording start time failed");
                }
                self.watch(rt.clone(), machine);
                self.compact_disk_if_long(rt.clone());
                tracing::info!(vm = %rt.id, snapshot = %rec.snap.id,
                    restore_ms = started.elapsed().as_millis() as u64, "restored");
                if prior == VmState::Snapshotted {
                    self.record_wake(&rt.id, cause, &rec.snap.id, None);
                }
            }
            Err(e) => {
                let corrupt = e.chain().any(|c| {
                    c.downcast_ref::<ChunkError>()
                        .is_some_and(ChunkError::is_corruption)
                });
                let reason = if corrupt {
                    format!("snapshot_corrupt: restore of {} failed: {e:#}", rec.snap.id)
                } else {
                    format!("restore of {} failed: {e:#}", rec.snap.id)
                };
                tracing::error!(vm = %rt.id, %reason);
                if let Some(m) = rt.machine() {
                    m.kill();
                    m.wait_exit().await;
                }
                rt.lock().machine = None;
                self.clear_forwards(&rt);
                self.remove_runtime_files(&rt.id);
                // The VM stays as restorable as it was: its snapshots are intact.
                let to = match prior {
                    VmState::Running | VmState::Snapshotted => VmState::Snapshotted,
                    other => other,
                };
                if prior == VmState::Snapshotted {
                    self.record_wake(&rt.id, cause, &rec.snap.id, Some(reason.clone()));
                }
                if let Err(e) = self.transition(&rt, to, Some(reason)) {
                    tracing::error!(vm = %rt.id, error = %e, "recording restore failure failed");
                }
            }
        }
        drop(guard);
    }

    async fn restore_from(
        &self,
        rt: &VmRuntime,
        rec: &SnapshotRecord,
        prior: VmState,
        store: &ChunkStore,
    ) -> anyhow::Result<Arc<Machine>> {
        // A rollback first ends the running guest.
        if rt.machine().is_some() {
            self.halt(rt).await;
        }
        let dir = self.snapshot_dir(&rec.snap.id);
        let paths = self.paths(&rt.id);
        let complete = rec.local
            && dir.join("state").exists()
            && dir.join("mem").exists()
            && rec.layers.iter().all(|l| paths.dir.join(l).exists());
        // A wake from a snapshot that S3 holds takes its RAM image instead of
        // copying it (the guest's RAM file is the image); a rollback, or a
        // snapshot still uploading from this copy, gets a copy.
        let consume = prior == VmState::Snapshotted && rec.snap.status == SnapshotStatus::Ready;
        let layers = if complete {
            rec.layers.clone()
        } else {
            if rec.local {
                // The local copy is gone: stop trusting it until a fetched
                // one is durable again.
                let mut gone = rec.clone();
                gone.local = false;
                self.save_record(&gone);
            }
            let layers = self.fetch(rt, rec, store).await?;
            if !consume {
                self.trust_fetched_copy_when_durable(&rec.snap.id);
            }
            layers
        };

        let _ = std::fs::remove_file(&paths.mem);
        if consume {
            if rec.local {
                let mut taken = rec.clone();
                taken.local = false;
                self.save_record(&taken);
            }
            move_file(&dir.join("mem"), &paths.mem).await?;
        } else {
            // A fresh RAM file; the snapshot's stays intact for later restores.
            let (src, dst) = (dir.join("mem"), paths.mem.clone());
            tokio::task::spawn_blocking(move || hatch_image::copy_sparse_unsynced(&src, &dst))
                .await
                .context("copy task")??;
        }

        let started = self.start_from(rt, &dir, &layers).await;
        let never_ran = started
            .as_ref()
            .err()
            .is_some_and(|e| e.downcast_ref::<GuestNeverRan>().is_some());
        if consume && never_ran {
            // Its RAM file is still the snapshot's image: give it back.
            if let Some(m) = rt.machine() {
                m.kill();
                m.wait_exit().await;
            }
            if move_file(&paths.mem, &dir.join("mem")).await.is_ok() && complete {
                self.save_record(rec);
            }
        }
        started
    }

    /// Launch QEMU over a new disk layer and load the snapshot's state
    /// (its RAM file is in place).
    async fn start_from(
        &self,
        rt: &VmRuntime,
        dir: &Path,
        layers: &[String],
    ) -> anyhow::Result<Arc<Machine>> {
        let paths = self.paths(&rt.id);
        let t0 = Instant::now();
        let prepare = async {
            // A new writable disk layer over the snapshot's frozen ones.
            let top = layers.last().context("snapshot has no disk layer")?;
            let vm = self.get(&rt.id)?;
            let new_layer = new_layer_name();
            hatch_vmm::disk::create_overlay(
                &paths.dir.join(top),
                "qcow2",
                &paths.dir.join(&new_layer),
                vm.disk_mib,
            )
            .await?;
            let mut all = layers.to_vec();
            all.push(new_layer);
            self.db.set_disk_layers(&rt.id, &all)?;
            self.launch(rt, true).await
        };
        let machine = prepare.await.context(GuestNeverRan)?;
        let t_launch = t0.elapsed();
        match machine.load_state(&dir.join("state")).await {
            Ok(()) => {}
            Err(e @ hatch_vmm::VmmError::StateRejected(_)) => {
                return Err(anyhow::Error::new(e).context(GuestNeverRan));
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context("loading the saved CPU and device state"));
            }
        }
        let t_load = t0.elapsed();
        // The guest's clock stood still since the capture and its RNG state
        // is shared with every other restore of this snapshot: fix both
        // before anyone talks to it. Images without the agent go without.
        match hatch_vmm::agent::Agent::connect(&paths.agent_socket).await {
            Ok(mut agent) => {
                if let Err(e) = agent.sync_clock_and_rng().await {
                    tracing::warn!(vm = %rt.id, error = %e, "clock and RNG not synced");
                }
                rt.lock().agent = Some(agent);
            }
            Err(e) => tracing::warn!(vm = %rt.id, error = %e, "no guest agent channel"),
        }
        let ms = |d: std::time::Duration| d.as_millis() as u64;
        tracing::debug!(vm = %rt.id, launch_done_ms = ms(t_launch),
            state_loaded_ms = ms(t_load), agent_done_ms = ms(t0.elapsed()), "restore steps");
        Ok(machine)
    }

    /// Fetched state and memory are written without fsync (the restore does
    /// not wait for the disk); once they are durable, in the background, the
    /// snapshot's local copy is trusted for the next restore.
    fn trust_fetched_copy_when_durable(&self, snapshot_id: &str) {
        let dir = self.snapshot_dir(snapshot_id);
        let db = self.db.clone();
        let id = snapshot_id.to_string();
        tokio::task::spawn_blocking(move || {
            let synced = ["mem", "state", ""].iter().all(|f| {
                std::fs::File::open(dir.join(f))
                    .and_then(|f| f.sync_all())
                    .is_ok()
            });
            if !synced {
                return;
            }
            if let Ok(Some(mut rec)) = db.get_snapshot(&id) {
                rec.local = true;
                if let Err(e) = db.save_snapshot(&rec) {
                    tracing::warn!(snapshot = %id, error = %e, "recording local copy failed");
                }
            }
        });
    }

    /// Download a snapshot from S3: state and memory into its local
    /// directory, missing disk layers into the VM's directory, each rebased
    /// onto this host's paths. Returns the layer names.
    async fn fetch(
        &self,
        rt: &VmRuntime,
        rec: &SnapshotRecord,
        store: &ChunkStore,
    ) -> anyhow::Result<Vec<String>> {
        let started = Instant::now();
        let bytes = store
            .get(&manifest_key(&rt.id, &rec.snap.id))
            .await
            .context("reading the snapshot manifest")?;
        let manifest = Manifest::decode(&bytes).map_err(|reason| ChunkError::Corrupt {
            id: format!("manifest of {}", rec.snap.id),
            reason,
        })?;
        // State and memory land in the snapshot's local directory as a
        // cache, unsynced: the record is not marked local, so after a crash
        // they are fetched again rather than trusted.
        let dir = self.snapshot_dir(&rec.snap.id);
        let tmp = dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        let state_and_memory = async {
            let state = store
                .download_file(&manifest.device_state, &tmp.join("state"))
                .await?;
            let mem = store
                .download_file(&manifest.memory, &tmp.join("mem"))
                .await?;
            anyhow::Ok(state.fetched_bytes + mem.fetched_bytes)
        };
        // Disk layers come down at the same time as memory.
        let (a, b) = tokio::try_join!(
            state_and_memory,
            self.fetch_layers(&rt.id, &manifest, store)
        )?;
        let fetched = a + b;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir)?;
        tracing::info!(vm = %rt.id, snapshot = %rec.snap.id, fetched_bytes = fetched,
            ms = started.elapsed().as_millis() as u64, "fetched snapshot from S3");
        Ok(manifest.disk_layers.into_iter().map(|l| l.name).collect())
    }
}

impl VmManager {
    /// Download the disk layers this host lacks into the VM's directory,
    /// each rebased onto this host's paths (all at once: a rebase only
    /// rewrites the header, it does not need the backing file yet), and make
    /// them durable before they join the VM's disk chain. Returns the bytes
    /// fetched.
    async fn fetch_layers(
        &self,
        vm_id: &str,
        manifest: &Manifest,
        store: &ChunkStore,
    ) -> anyhow::Result<u64> {
        let image = self.images.get(&manifest.image)?;
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
                let part = path.with_extension("partial");
                let report = store.download_file(&layer.chunks, &part).await?;
                rebase(&part, &backing, &backing_format).await?;
                let p = part.clone();
                tokio::task::spawn_blocking(move || std::fs::File::open(&p)?.sync_all())
                    .await
                    .context("sync task")?
                    .with_context(|| format!("syncing {}", part.display()))?;
                std::fs::rename(&part, &path)?;
                anyhow::Ok(report.fetched_bytes)
            },
        ))
        .await?;
        Ok(fetched.iter().sum())
    }
}

/// Marks a restore that failed before the guest ran (its RAM file is
/// untouched).
#[derive(Debug)]
struct GuestNeverRan;

impl std::fmt::Display for GuestNeverRan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("restore stopped before the guest ran")
    }
}

/// Point a downloaded qcow2 layer at its backing file on this host (the
/// header holds the absolute path of wherever it was captured).
async fn rebase(layer: &Path, backing: &Path, backing_format: &str) -> anyhow::Result<()> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["rebase", "-u", "-f", "qcow2", "-F", backing_format, "-b"])
        .arg(backing)
        .arg(layer)
        .output()
        .await
        .context("running qemu-img rebase")?;
    anyhow::ensure!(
        out.status.success(),
        "qemu-img rebase failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}
