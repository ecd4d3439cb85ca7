//! Local copies of snapshots are a cache, bounded by a budget
//! (`local_cache_bytes`, default 40% of the data dir's file system): beyond
//! it, the least recently used copies of snapshots that S3 already holds are
//! evicted (a later restore of one reads S3). The only copy of a snapshot
//! not yet in S3 is never evicted. Eviction takes no operation lock (see
//! `enforce_local_budget`). Disk layers are shared with the VM's own disk
//! chain and not counted; a layer that neither the chain nor any local copy
//! uses is removed at the next disk compaction or daemon start.
//!
//! At start-up, what a crash left behind is swept: `*.partial` files and
//! directories, snapshot directories no record trusts, unused layers.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::manager::VmManager;
use crate::model::{LocalStorage, SnapshotStatus};
use crate::state::{SnapshotRecord, StoreError};

/// A restore reading a local copy (see [`VmManager::use_local_copy`]).
pub(crate) struct CopyInUse<'a> {
    vms: &'a VmManager,
    id: String,
}

impl Drop for CopyInUse<'_> {
    fn drop(&mut self) {
        let mut in_use = self
            .vms
            .copies_in_use
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = in_use.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                in_use.remove(&self.id);
            }
        }
    }
}

/// Share of the data dir's file system that local copies may use by default.
const DEFAULT_BUDGET_PERCENT: u64 = 40;

impl VmManager {
    pub(crate) fn local_budget(&self) -> u64 {
        self.cfg.local_cache_bytes.unwrap_or_else(|| {
            hatch_vmm::host::fs_size_bytes(&self.cfg.data_dir).unwrap_or(0) * DEFAULT_BUDGET_PERCENT
                / 100
        })
    }

    /// Snapshots with a local copy on this node (in a cluster the database
    /// also holds other nodes'), least recently used first.
    async fn own_local_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        let mut local = self.store.local_snapshots().await?;
        local.retain(|r| self.runs_here(&r.snap.vm_id));
        Ok(local)
    }

    /// Bytes on disk of every local copy, and of the evictable ones.
    pub(crate) async fn local_usage(&self) -> LocalStorage {
        let mut usage = LocalStorage {
            budget_bytes: self.local_budget(),
            evictions: self.evictions.load(Ordering::Relaxed),
            ..Default::default()
        };
        for rec in self.own_local_snapshots().await.unwrap_or_default() {
            let bytes = allocated_bytes(&self.snapshot_dir(&rec.snap.id));
            usage.bytes += bytes;
            usage.snapshots += 1;
            if rec.snap.status == SnapshotStatus::Ready {
                usage.evictable_bytes += bytes;
            }
        }
        self.metrics.local_bytes.set(usage.bytes as i64);
        usage
    }

    /// Check the budget in the background (after a capture or an upload).
    pub(crate) async fn enforce_local_budget_soon(self: &Arc<Self>) {
        let this = self.clone();
        self.tasks
            .spawn(async move { this.enforce_local_budget().await });
    }

    /// Evict least recently used copies that S3 holds until the local
    /// copies fit the budget. No operation lock is taken (housekeeping must
    /// not make a user's call on the VM fail with 409): a copy a restore is
    /// reading is registered in `copies_in_use` and skipped; a restore that
    /// starts after its eviction finds the copy gone and reads S3. Layers a
    /// copy alone needed are removed later, by the next compaction or start.
    pub(crate) async fn enforce_local_budget(&self) {
        let budget = self.local_budget();
        let Ok(local) = self.own_local_snapshots().await else {
            return;
        };
        let sizes: Vec<u64> = local
            .iter()
            .map(|r| allocated_bytes(&self.snapshot_dir(&r.snap.id)))
            .collect();
        let mut total: u64 = sizes.iter().sum();
        for (rec, size) in local.into_iter().zip(sizes) {
            if total <= budget {
                break;
            }
            if rec.snap.status != SnapshotStatus::Ready {
                continue;
            }
            let dir = self.snapshot_dir(&rec.snap.id);
            let doomed = dir.with_extension("evicted");
            // Re-read: a wake may have taken the copy meanwhile.
            let Ok(Some(mut current)) = self.store.get_snapshot(&rec.snap.id).await else {
                continue;
            };
            if !current.local || current.snap.status != SnapshotStatus::Ready {
                continue;
            }
            {
                let in_use = self.copies_in_use.lock().unwrap_or_else(|p| p.into_inner());
                if in_use.contains_key(&rec.snap.id) {
                    continue;
                }
                // Out of a restore's sight at once (under the lock: no
                // restore registers meanwhile); deleted below. A restore
                // that registers after this finds no copy and reads S3.
                if let Err(e) = std::fs::rename(&dir, &doomed) {
                    tracing::warn!(snapshot = %rec.snap.id, error = %e, "could not evict a copy");
                    continue;
                }
            }
            current.local = false;
            self.save_record(&current).await;
            self.evictions.fetch_add(1, Ordering::Relaxed);
            self.metrics.local_evictions.inc();
            if let Err(e) = std::fs::remove_dir_all(&doomed) {
                tracing::warn!(snapshot = %rec.snap.id, error = %e, "could not remove an evicted copy");
            }
            // A standby mapping the copy's image would keep its space taken.
            if let Ok(rt) = self.supervisor(&rec.snap.vm_id) {
                self.discard_standby_for(&rt, &rec.snap.id).await;
            }
            total = total.saturating_sub(size);
            tracing::info!(snapshot = %rec.snap.id, vm = %rec.snap.vm_id, bytes = size,
                budget, "evicted a local snapshot copy (S3 holds it)");
        }
        self.metrics.local_bytes.set(total as i64);
    }

    /// Mark a snapshot's local copy as read by a restore until the guard
    /// is dropped: eviction leaves it alone meanwhile.
    pub(crate) fn use_local_copy(&self, snapshot_id: &str) -> CopyInUse<'_> {
        *self
            .copies_in_use
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(snapshot_id.to_string())
            .or_default() += 1;
        CopyInUse {
            vms: self,
            id: snapshot_id.to_string(),
        }
    }

    /// Remove layer files of a VM that neither its disk chain nor any local
    /// copy of its snapshots uses (snapshots only in S3 fetch their layers
    /// again). Call under the VM's operation lock: a capture creates layer
    /// files before it records them.
    pub(crate) async fn prune_layers(&self, vm_id: &str) -> anyhow::Result<()> {
        let mut keep: HashSet<String> = self.store.disk_layers(vm_id).await?.into_iter().collect();
        for rec in self.store.list_snapshots(vm_id).await? {
            if rec.local {
                keep.extend(rec.layers);
            }
        }
        let dir = self.paths(vm_id).dir;
        for entry in std::fs::read_dir(&dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            let unused = name.ends_with(".qcow2") && !keep.contains(&name);
            if unused {
                tracing::info!(vm = %vm_id, layer = %name, "removing an unused disk layer");
                if let Err(e) = std::fs::remove_file(dir.join(&name)) {
                    tracing::warn!(vm = %vm_id, layer = %name, error = %e, "could not remove layer");
                }
            }
        }
        Ok(())
    }

    /// At start-up, after recovery and before any operation: remove what
    /// interrupted work left behind.
    pub(crate) async fn sweep_leftovers(&self) {
        let snapshots = self.cfg.data_dir.join("snapshots");
        if let Ok(entries) = std::fs::read_dir(&snapshots) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let record = self.store.get_snapshot(&name).await.ok().flatten();
                // Kept: complete copies, and suspends still being completed
                // (their saved state may be the VM's only state).
                let trusted = record
                    .as_ref()
                    .is_some_and(|r| r.local || r.snap.status == SnapshotStatus::Capturing);
                if let Some(r) = record.filter(|r| r.local) {
                    self.describe_legacy_copy(&r);
                }
                if !trusted {
                    // A fetch or capture cut short, a copy a wake consumed, a
                    // failed or deleted snapshot's files.
                    tracing::info!(dir = %e.path().display(), "removing an untrusted snapshot directory");
                    let _ = std::fs::remove_dir_all(e.path());
                } else {
                    remove_partials(&e.path());
                }
            }
        }
        for vm in self.store.list_vms().await.unwrap_or_default() {
            if !self.runs_here(&vm.vm.id) {
                continue; // another node's
            }
            let dir = self.paths(&vm.vm.id).dir;
            remove_partials(&dir);
            // A running QEMU's chain may not be the recorded one (if it could
            // not be read back): its layers are pruned by its next compaction.
            if vm.vm.state.has_process() {
                continue;
            }
            if let Err(e) = self.prune_layers(&vm.vm.id).await {
                tracing::warn!(vm = %vm.vm.id, error = %e, "could not prune disk layers");
            }
        }
    }
}

impl VmManager {
    /// A local copy made before copies were described (`local.json`) is
    /// described once, as it is: it was trusted when it was made.
    fn describe_legacy_copy(&self, rec: &crate::state::SnapshotRecord) {
        let dir = self.snapshot_dir(&rec.snap.id);
        if dir.join(super::local_copy::FILE).exists() {
            return;
        }
        let vm_dir = self.paths(&rec.snap.vm_id).dir;
        let described = super::local_copy::LocalCopy::describe(
            &dir,
            &vm_dir,
            &rec.snap.id,
            &rec.snap.vm_id,
            rec.snap.kind,
            &rec.layers,
        )
        .and_then(|c| c.write(&dir, &self.seal_keys));
        match described {
            Ok(()) => {
                tracing::info!(snapshot = %rec.snap.id, "described a local copy made by an earlier version")
            }
            Err(e) => {
                tracing::warn!(snapshot = %rec.snap.id, error = %e, "cannot describe a local copy")
            }
        }
    }
}

/// Remove `*.partial` files in `dir`.
fn remove_partials(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().ends_with(".partial") {
            tracing::info!(file = %e.path().display(), "removing a leftover partial file");
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Bytes allocated on disk by the files in `dir` (RAM images are sparse).
fn allocated_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_files_count_what_they_hold() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join("mem")).unwrap();
        f.set_len(1 << 30).unwrap();
        std::fs::write(dir.path().join("state"), vec![1u8; 1 << 20]).unwrap();
        let n = allocated_bytes(dir.path());
        assert!((1 << 20..4 << 20).contains(&n), "{n}");
        std::fs::write(dir.path().join("x.partial"), b"x").unwrap();
        remove_partials(dir.path());
        assert!(!dir.path().join("x.partial").exists());
        assert!(dir.path().join("state").exists());
    }
}
