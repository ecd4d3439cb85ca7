//! Standby QEMUs (`supervisor/standby.rs`): once a suspended VM's snapshot
//! is in S3, so that its next wake will take the local copy's RAM image as
//! it is, a QEMU is started with exactly that wake's command line (the RAM
//! image, the disk layer made ahead, the last host ports) and waits for
//! the state. At most `standby_qemus` VMs hold one, the most recently
//! suspended; the oldest is ended to make room.
//!
//! Safety of the VM's state: a standby never runs the guest (QEMU waits
//! for an incoming state that only a wake gives it), maps the image without
//! writing to it, and opens the new disk layer inactive. A wake uses it
//! only if it fits exactly ([`LaunchedAs::fits`]) and still waits; any
//! other launch of the VM, a stop or a delete ends it first. A standby left
//! by a daemon that died is ended at the next start, which then starts
//! standbys of its own for the most recently suspended VMs.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use hatch_vmm::Machine;
use prometheus_client::metrics::gauge::Gauge;

use crate::boot::pick_forwards;
use crate::manager::VmManager;
use crate::model::{SnapshotStatus, VmState};
use crate::snapshot::new_layer_name;
use crate::supervisor::standby::{LaunchedAs, file_id};
use crate::supervisor::{Standby, VmSupervisor};

/// How a suspend keeps its QEMU warm: the disk switch it makes in the
/// pause, from the VM's top layer to a new one, and what that QEMU was
/// launched as.
#[derive(Clone)]
pub(super) struct WarmSwitch {
    pub top: String,
    pub next: String,
    launched: LaunchedAs,
}

/// The VMs holding a standby QEMU, oldest first, each with whether it is
/// warm.
pub struct StandbyPool {
    order: Mutex<VecDeque<(String, bool)>>,
    /// Their number, for `/metrics`.
    gauge: Gauge,
}

impl StandbyPool {
    pub fn new(gauge: Gauge) -> StandbyPool {
        StandbyPool {
            order: Mutex::default(),
            gauge,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(String, bool)>> {
        self.order.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count VM `id` in as the newest; returns the VMs beyond `cap`, whose
    /// standbys are to be ended: the oldest cold ones first, then the
    /// oldest warm ones (a warm standby wakes its VM several times faster).
    pub fn admit(&self, id: &str, cap: usize, warm: bool) -> Vec<String> {
        let mut order = self.lock();
        order.retain(|(v, _)| v != id);
        order.push_back((id.to_string(), warm));
        let mut evicted = Vec::new();
        while order.len() > cap {
            let i = order.iter().position(|(_, w)| !w).unwrap_or(0);
            if let Some((v, _)) = order.remove(i) {
                evicted.push(v);
            }
        }
        self.gauge.set(order.len() as i64);
        evicted
    }

    /// Whether a cold standby for VM `id` would stay without ending a warm
    /// one: the pool has room, or holds a cold one to end.
    pub fn room_for_cold(&self, id: &str, cap: usize) -> bool {
        let order = self.lock();
        let others = order.iter().filter(|(v, _)| v != id);
        others.clone().count() < cap || others.clone().any(|(_, w)| !w)
    }

    /// VM `id` no longer holds one.
    pub fn forget(&self, id: &str) {
        let mut order = self.lock();
        order.retain(|(v, _)| v != id);
        self.gauge.set(order.len() as i64);
    }

    pub fn all(&self) -> Vec<String> {
        self.lock().iter().map(|(v, _)| v.clone()).collect()
    }
}

impl VmManager {
    /// Start, in the background, a standby QEMU for the next wake of VM
    /// `vm_id` from snapshot `snapshot_id` (just uploaded), if it is
    /// suspended and that is the snapshot it wakes from.
    pub(super) fn stand_by_soon(self: &Arc<Self>, vm_id: &str, snapshot_id: &str) {
        if self.cfg.standby_qemus == 0 {
            return;
        }
        let Ok(rt) = self.supervisor(vm_id) else {
            return;
        };
        let (this, snapshot_id) = (self.clone(), snapshot_id.to_string());
        tokio::spawn(async move {
            match this.stand_by(&rt, &snapshot_id).await {
                Ok(Some(evicted)) => {
                    for other in evicted {
                        if let Ok(other) = this.supervisor(&other) {
                            this.discard_standby(&other).await;
                        }
                    }
                    // A wake that began meanwhile waits for the slot and
                    // takes it; anything else ends it.
                    if !matches!(rt.state(), VmState::Snapshotted | VmState::Restoring) {
                        this.discard_standby(&rt).await;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::info!(vm = %rt.id, error = format!("{e:#}"), "no standby QEMU")
                }
            }
        });
    }

    /// At start (recovery done, the previous daemon's standbys ended):
    /// standbys for the most recently suspended VMs, as their uploads would
    /// have started them, so that a restart does not cool their wakes.
    pub(crate) async fn stand_by_after_start(self: &Arc<Self>) {
        if self.cfg.standby_qemus == 0 {
            return;
        }
        let mut candidates = Vec::new();
        for rt in self.all_supervisors() {
            if rt.state() != VmState::Snapshotted {
                continue;
            }
            // The snapshot a wake restores; `stand_by` checks the rest.
            if let Ok(Some(rec)) = self.newest_restorable(&rt.id).await {
                candidates.push((rec.snap.created_at, rt.id.clone(), rec.snap.id));
            }
        }
        // RFC 3339 times in UTC: newest first by their text.
        candidates.sort_by(|a, b| b.0.cmp(&a.0));
        for (_, vm, snapshot) in candidates.into_iter().take(self.cfg.standby_qemus) {
            self.stand_by_soon(&vm, &snapshot);
        }
    }

    /// Launch the standby into the VM's slot and count it in the pool;
    /// returns the VMs whose standbys are now beyond the bound, or None
    /// when there is no reason for one (not suspended, not that snapshot).
    /// A VM with outbound network gets its tap opened by the standby but
    /// not addressed (the wake does that), so its /30 stays free for
    /// others meanwhile; if another VM takes it, the wake's link, and so
    /// its command line, differ, and the standby is not used.
    async fn stand_by(
        &self,
        rt: &Arc<VmSupervisor>,
        snapshot_id: &str,
    ) -> anyhow::Result<Option<Vec<String>>> {
        let mut slot = rt.standby.lock().await;
        // Under the slot's lock: a launch of the VM (which changes its
        // state first) waits for this one or is waited for.
        if rt.state() != VmState::Snapshotted {
            tracing::debug!(vm = %rt.id, state = %rt.state(), "no standby QEMU: not suspended");
            return Ok(None);
        }
        if slot
            .as_ref()
            .is_some_and(|s| s.warm && s.snapshot_id == snapshot_id)
        {
            // Kept warm by the suspend: nothing started now would be better.
            return Ok(None);
        }
        let vm = self.get(&rt.id).await?;
        // The snapshot a wake restores, if it is this one, in S3 (so the
        // wake takes its image rather than copying it) and here. (An older
        // one's upload that ends late leaves the slot alone.)
        let newest = self.newest_restorable(&rt.id).await?;
        let Some(rec) = newest.filter(|r| {
            r.snap.id == snapshot_id && r.local && r.snap.status == SnapshotStatus::Ready
        }) else {
            tracing::debug!(vm = %rt.id, snapshot = snapshot_id, "no standby QEMU: not the snapshot a wake takes as it is");
            return Ok(None);
        };
        if !self.standbys.room_for_cold(&rt.id, self.cfg.standby_qemus) {
            tracing::debug!(vm = %rt.id, "no standby QEMU: the pool holds only warm ones");
            return Ok(None);
        }
        if let Some(old) = slot.take() {
            self.standbys.forget(&rt.id);
            old.discard().await;
        }
        let layers = self
            .verified_local_copy(&rec, &vm)
            .await
            .map_err(|why| anyhow::anyhow!("the local copy cannot be used: {why}"))?;
        let top = layers.last().context("snapshot has no disk layer")?;
        // Made at suspend; made now if gone (a restart's sweep removes it).
        let layer = match self.peek_next_layer(&rt.id, top, vm.disk_mib) {
            Some(layer) => layer,
            None => {
                self.prepare_next_layer(&rt.id, top, vm.disk_mib).await?;
                self.peek_next_layer(&rt.id, top, vm.disk_mib)
                    .context("the disk layer made for the wake is gone")?
            }
        };
        let plan = self.launch_plan(&rt.id, false).await?;
        let previous = rt.lock().last_ports.clone();
        let forwards = pick_forwards(&plan.guest_ports, &previous, true)?;
        let image = self.snapshot_dir(snapshot_id).join("mem");
        let mem_file = file_id(&image).context("the snapshot's RAM image is gone")?;
        let spec = plan.spec(self, &layer, true, image, forwards);
        if let Some(wait) = self.faults.delay("standby.launch", &rt.id) {
            tokio::time::sleep(wait).await;
        }
        let machine = Machine::launch(&self.cfg.qemu_binary, &spec).await?;
        // Checked again now that QEMU has opened the image. A wake that
        // began meanwhile may have moved it (QEMU would then have created
        // an empty file under the old name); a delete or a hand-over to
        // another node may have let go of the VM. A wake changes the state
        // before it moves the image, and delete and hand-over remove the
        // supervisor before they end the standby (waiting for this lock).
        let still_wanted = rt.state() == VmState::Snapshotted
            && self
                .supervisor(&rt.id)
                .is_ok_and(|current| Arc::ptr_eq(&current, rt))
            && file_id(&spec.mem_path) == Some(mem_file);
        if !still_wanted {
            machine.kill();
            machine.wait_exit().await;
            tracing::debug!(vm = %rt.id, "no standby QEMU: the VM changed while it started");
            return Ok(None);
        }
        machine.set_command_timeout(self.cfg.qmp_timeout);
        tracing::info!(vm = %rt.id, snapshot = snapshot_id, pid = machine.pid(), "standby QEMU started");
        *slot = Some(Standby {
            machine: Arc::new(machine),
            snapshot_id: snapshot_id.to_string(),
            launched: LaunchedAs { spec, mem_file },
            warm: false,
        });
        Ok(Some(self.standbys.admit(
            &rt.id,
            self.cfg.standby_qemus,
            false,
        )))
    }

    /// Whether the suspend of `rt` starting now will keep its QEMU as a warm
    /// standby, and how. Not with (warm) standbys off, nor for a QEMU this daemon
    /// did not launch (its command line is not known) or whose RAM is
    /// served lazily (that server ends with its QEMU).
    pub(super) async fn warm_switch(&self, rt: &VmSupervisor) -> Option<WarmSwitch> {
        if self.cfg.standby_qemus == 0
            || !self.cfg.standby_warm
            || self.lazy_paths(&rt.id).marker.exists()
        {
            return None;
        }
        let paths = self.paths(&rt.id);
        let spec = rt.lock().launched.clone()?;
        if spec.mem_path != paths.mem {
            return None;
        }
        let mem_file = file_id(&paths.mem)?;
        let top = self.store.disk_layers(&rt.id).await.ok()?.last()?.clone();
        Some(WarmSwitch {
            top,
            next: new_layer_name(),
            launched: LaunchedAs { spec, mem_file },
        })
    }

    /// Take the QEMU of a suspend that saved its state from the VM, paused,
    /// as the standby for the wake from
    /// `snapshot_id`: what a QEMU launched for that wake (over the layer it
    /// switched to, with the ports it forwards) would be once loaded.
    pub(super) async fn detach_warm(
        &self,
        rt: &VmSupervisor,
        machine: Arc<Machine>,
        switch: WarmSwitch,
        snapshot_id: &str,
    ) -> Standby {
        let forwards = {
            let mut inner = rt.lock();
            inner.machine = None;
            inner.launched = None;
            inner.agent = None;
            inner.forwards.clone()
        };
        self.clear_forwards(rt).await;
        let mut launched = switch.launched;
        let vm_dir = self.paths(&rt.id).dir;
        launched.spec.disk = vm_dir.join(&switch.next);
        launched.spec.disk_node = crate::snapshot::node_name(&switch.next);
        launched.spec.incoming = true;
        launched.spec.forwards = forwards;
        Standby {
            machine,
            snapshot_id: snapshot_id.to_string(),
            launched,
            warm: true,
        }
    }

    /// Put a suspend's warm standby in the VM's slot and count it in the
    /// pool, ending the standbys beyond the bound.
    pub(super) async fn keep_warm(&self, rt: &VmSupervisor, standby: Standby) {
        tracing::info!(vm = %rt.id, snapshot = %standby.snapshot_id, pid = standby.machine.pid(), "QEMU kept as a warm standby");
        let evicted = {
            let mut slot = rt.standby.lock().await;
            if let Some(old) = slot.replace(standby) {
                old.discard().await;
            }
            self.standbys.admit(&rt.id, self.cfg.standby_qemus, true)
        };
        for other in evicted {
            if let Ok(other) = self.supervisor(&other) {
                self.discard_standby(&other).await;
            }
        }
    }

    /// End the VM's standby QEMU, if it has one.
    pub(crate) async fn discard_standby(&self, rt: &VmSupervisor) {
        self.discard_standby_if(rt, |_| true).await;
    }

    /// End the VM's standby QEMU if it was started for snapshot
    /// `snapshot_id`.
    pub(crate) async fn discard_standby_for(&self, rt: &VmSupervisor, snapshot_id: &str) {
        self.discard_standby_if(rt, |s| s.snapshot_id == snapshot_id)
            .await;
    }

    async fn discard_standby_if(&self, rt: &VmSupervisor, which: impl Fn(&Standby) -> bool) {
        let standby = {
            let mut slot = rt.standby.lock().await;
            if slot.as_ref().is_some_and(which) {
                // Under the lock: a standby installed next is counted anew.
                self.standbys.forget(&rt.id);
                slot.take()
            } else {
                None
            }
        };
        if let Some(standby) = standby {
            tracing::debug!(vm = %rt.id, snapshot = %standby.snapshot_id, "ending the standby QEMU");
            standby.discard().await;
        }
    }

    /// End every standby QEMU (the daemon stops: they would outlive it).
    pub(crate) async fn discard_all_standbys(&self) {
        for id in self.standbys.all() {
            if let Ok(rt) = self.supervisor(&id) {
                self.discard_standby(&rt).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_ends_the_oldest_beyond_its_bound() {
        let pool = StandbyPool::new(Gauge::default());
        assert!(pool.admit("a", 2, false).is_empty());
        assert!(pool.admit("b", 2, false).is_empty());
        // Admitted again: the newest, not a second entry.
        assert!(pool.admit("a", 2, false).is_empty());
        assert_eq!(pool.admit("c", 2, false), ["b"]);
        assert_eq!(pool.all(), ["a", "c"]);
        pool.forget("a");
        assert_eq!(pool.all(), ["c"]);
        assert_eq!(pool.gauge.get(), 1);
        assert_eq!(pool.admit("d", 0, false), ["c", "d"]);
        assert_eq!(pool.gauge.get(), 0);
    }

    #[test]
    fn the_pool_ends_cold_standbys_before_warm_ones() {
        let pool = StandbyPool::new(Gauge::default());
        assert!(pool.admit("w1", 2, true).is_empty());
        assert!(pool.admit("c1", 2, false).is_empty());
        // A warm one ends the cold one although it is newer.
        assert_eq!(pool.admit("w2", 2, true), ["c1"]);
        // Full of warm ones: no room for a cold one, which would end one.
        assert!(!pool.room_for_cold("c2", 2));
        assert!(pool.room_for_cold("w1", 2), "its own slot is room");
        // Another warm one ends the oldest warm one.
        assert_eq!(pool.admit("w3", 2, true), ["w1"]);
        pool.forget("w2");
        assert!(pool.room_for_cold("c2", 2));
        assert!(pool.admit("c2", 2, false).is_empty());
        assert_eq!(pool.all(), ["w3", "c2"]);
    }
}
