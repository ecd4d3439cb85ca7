//! Local copies of snapshots are a cache, bounded by a budget
//! (`local_cache_bytes`, default 40% of the data dir's file system): beyond
//! it, the least recently used copies of snapshots that S3 already holds are
//! evicted (a later restore of one reads S3). The only copy of a snapshot
//! not yet in S3 is never evicted. Disk layers are shared with the VM's own
//! disk chain and counted apart; a layer that neither the chain nor any
//! local copy uses is removed with the last copy that needed it.
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

/// Share of the data dir's file system that local copies may use by default.
const DEFAULT_BUDGET_PERCENT: u64 = 40;

impl VmManager {
    pub(crate) fn local_budget(&self) -> u64 {
        self.cfg.local_cache_bytes.unwrap_or_else(|| {
            hatch_vmm::host::fs_size_bytes(&self.cfg.data_dir).unwrap_or(0) * DEFAULT_BUDGET_PERCENT
                / 100
        })
    }

    /// Bytes on disk of every local copy, and of the evictable ones.
    pub(crate) fn local_usage(&self) -> LocalStorage {
        let mut usage = LocalStorage {
            budget_bytes: self.local_budget(),
            evictions: self.evictions.load(Ordering::Relaxed),
            ..Default::default()
        };
        for rec in self.db.local_snapshots().unwrap_or_default() {
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
    pub(crate) fn enforce_local_budget_soon(self: &Arc<Self>) {
        let this = self.clone();
        self.tasks
            .spawn(async move { this.enforce_local_budget().await });
    }

    /// Evict least recently used copies that S3 holds until the local
    /// copies fit the budget. A VM busy with an operation is skipped (its
    /// copies may be in use); the next round gets them.
    pub(crate) async fn enforce_local_budget(&self) {
        let budget = self.local_budget();
        let Ok(local) = self.db.local_snapshots() else {
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
            let Ok(rt) = self.runtime(&rec.snap.vm_id) else {
                continue;
            };
            let Ok(_guard) = rt.try_begin("local copy eviction") else {
                continue;
            };
            // Re-read under the lock: a restore may have taken the copy.
            let Ok(Some(mut current)) = self.db.get_snapshot(&rec.snap.id) else {
                continue;
            };
            if !current.local || current.snap.status != SnapshotStatus::Ready {
                continue;
            }
            current.local = false;
            self.save_record(&current);
            if let Err(e) = std::fs::remove_dir_all(self.snapshot_dir(&current.snap.id)) {
                tracing::warn!(snapshot = %current.snap.id, error = %e, "could not remove an evicted copy");
            }
            if let Err(e) = self.prune_layers(&current.snap.vm_id) {
                tracing::warn!(vm = %current.snap.vm_id, error = %e, "could not prune disk layers");
            }
            total = total.saturating_sub(size);
            self.evictions.fetch_add(1, Ordering::Relaxed);
            self.metrics.local_evictions.inc();
            tracing::info!(snapshot = %current.snap.id, vm = %current.snap.vm_id, bytes = size,
                budget, "evicted a local snapshot copy (S3 holds it)");
        }
        self.metrics.local_bytes.set(total as i64);
    }

    /// Remove layer files of a VM that neither its disk chain nor any local
    /// copy of its snapshots uses (snapshots only in S3 fetch their layers
    /// again). Call under the VM's operation lock: a capture creates layer
    /// files before it records them.
    pub(crate) fn prune_layers(&self, vm_id: &str) -> anyhow::Result<()> {
        let mut keep: HashSet<String> = self.db.disk_layers(vm_id)?.into_iter().collect();
        for rec in self.db.list_snapshots(vm_id)? {
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
    pub(crate) fn sweep_leftovers(&self) {
        let snapshots = self.cfg.data_dir.join("snapshots");
        if let Ok(entries) = std::fs::read_dir(&snapshots) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let trusted = matches!(self.db.get_snapshot(&name), Ok(Some(r)) if r.local);
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
        for vm in self.db.list_vms().unwrap_or_default() {
            let dir = self.paths(&vm.vm.id).dir;
            remove_partials(&dir);
            if let Err(e) = self.prune_layers(&vm.vm.id) {
                tracing::warn!(vm = %vm.vm.id, error = %e, "could not prune disk layers");
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
