//! Lost nodes and their VMs. Every node checks, with each heartbeat, for
//! nodes not heard from for the down time, and takes over their VMs that had
//! a process (or a suspend not yet in S3): one with a ready snapshot in S3
//! becomes `snapshotted` from the newest one (its `state_reason` says which,
//! and that work since is gone), one without becomes `failed`; the VM is
//! then the taking node's. Each takeover is one compare-and-set on the VM's
//! epoch and owner that also requires the owner's heartbeat to be stale, so
//! exactly one node does it and a node that comes back keeps its VMs or, if
//! too late, finds them owned by another and lets go (`lease.rs`). The next request (or `start`/`restore`) through any node
//! then claims the VM for that node ([`VmManager::adopt`]) and wakes it
//! there from S3.

use std::collections::HashSet;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::cluster::nodes::heartbeat_every;
use crate::cluster::placement;
use crate::manager::{VmManager, now_rfc3339};
use crate::model::{SnapshotStatus, VmEvent, VmState};
use crate::state::{Claim, StoreError};
use crate::supervisor::VmSupervisor;

impl VmManager {
    /// Take over the VMs of lost nodes until `shutdown` (cluster mode only).
    pub async fn takeover_worker(self: Arc<Self>, shutdown: CancellationToken) {
        if !self.shares_state() {
            return;
        }
        let mut tick = tokio::time::interval(heartbeat_every(self.cfg.node_down_after));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.take_over_lost_vms().await {
                tracing::warn!(error = %anyhow::Error::from(e), "checking for lost nodes failed");
            }
        }
    }

    /// One pass: every VM of a node that is down whose current state was
    /// that node's alone (a process, or a suspend not yet in S3).
    pub(crate) async fn take_over_lost_vms(&self) -> Result<(), StoreError> {
        let down_after = self.cfg.node_down_after;
        let me = self.cfg.node_name.as_str();
        let lost: HashSet<String> = self
            .store
            .list_nodes()
            .await?
            .into_iter()
            .filter(|n| n.silent_for > down_after && n.name != me)
            .map(|n| n.name)
            .collect();
        if lost.is_empty() {
            return Ok(());
        }
        for rec in self.store.list_vms().await? {
            let Some(node) = rec.vm.node.as_deref() else {
                continue;
            };
            if !lost.contains(node) || !has_process_or_suspend(rec.vm.state) {
                continue;
            }
            let snapshots = self.store.list_snapshots(&rec.vm.id).await?;
            let newest_ready = snapshots
                .iter()
                .find(|s| s.snap.status == SnapshotStatus::Ready)
                .cloned();
            let newest_in_s3 = snapshots
                .first()
                .is_some_and(|s| s.snap.status == SnapshotStatus::Ready);
            if rec.vm.state == VmState::Snapshotted && newest_in_s3 {
                continue; // restorable anywhere as it is: a request claims it
            }
            let silent = down_after.as_secs();
            let (state, reason) = match &newest_ready {
                Some(s) => (
                    VmState::Snapshotted,
                    format!(
                        "node '{node}' was lost (no heartbeat for over {silent} s): the vm resumes from \
                         snapshot {} taken at {}; work done after that is gone",
                        s.snap.id, s.snap.created_at
                    ),
                ),
                None => (
                    VmState::Failed,
                    format!(
                        "node '{node}' was lost (no heartbeat for over {silent} s) and the vm has no \
                         snapshot in S3 to resume from"
                    ),
                ),
            };
            let claim = Claim {
                id: &rec.vm.id,
                seen: rec.epoch,
                from: Some(node),
                to: me,
                from_silent_for: Some(down_after),
            };
            if !self.store.take_over_vm(&claim, state, &reason).await? {
                continue; // another node did it first, or the node came back
            }
            tracing::warn!(vm = %rec.vm.id, lost = %node, %state, %reason, "took over a lost node's vm");
            // What the lost node had not uploaded is gone with it.
            for mut snap in snapshots {
                if !matches!(
                    snap.snap.status,
                    SnapshotStatus::Ready | SnapshotStatus::Failed
                ) {
                    snap.snap.status = SnapshotStatus::Failed;
                    snap.snap.error = Some(format!(
                        "node '{node}' was lost before this snapshot reached S3"
                    ));
                }
                snap.local = false;
                self.store.save_snapshot(&snap).await?;
            }
            let event = VmEvent {
                vm_id: rec.vm.id.clone(),
                at: now_rfc3339(),
                kind: "takeover".into(),
                trigger: "node_lost".into(),
                duration_ms: None,
                snapshot_id: newest_ready.map(|s| s.snap.id),
                error: (state == VmState::Failed).then(|| reason.clone()),
                warnings: Vec::new(),
            };
            if let Err(e) = self.store.add_event(&event).await {
                tracing::warn!(vm = %rec.vm.id, error = %anyhow::Error::from(e), "recording the takeover failed");
            }
        }
        Ok(())
    }

    /// Give a suspended VM whose node is down (or that has none) a new
    /// owner, where it then wakes from S3: the least loaded up node with
    /// room ([`placement`]; this one on a tie, or when none has room). Only
    /// if its newest snapshot is in S3 (else the takeover above decides
    /// what it resumes from, and says so); one compare-and-set that also
    /// requires the owner to be silent, so only one node wins and an owner
    /// that comes back keeps its VM. The lost node's local copies are no
    /// one's now: its snapshots are marked as not local. Ok(None): not
    /// claimable (or claimed by another node first).
    pub(crate) async fn adopt(&self, vm_id: &str) -> Result<Option<Claimed>, StoreError> {
        let Some(rec) = self.store.get_vm(vm_id).await? else {
            return Ok(None);
        };
        let me = self.cfg.node_name.as_str();
        if rec.vm.state != VmState::Snapshotted || rec.vm.node.as_deref() == Some(me) {
            return Ok(None);
        }
        let snapshots = self.store.list_snapshots(vm_id).await?;
        if !snapshots
            .first()
            .is_some_and(|s| s.snap.status == SnapshotStatus::Ready)
        {
            return Ok(None);
        }
        // A node without the cluster secret cannot forward to another: it
        // keeps what it claims.
        let to = if self.hop.is_some() {
            let mut nodes =
                crate::cluster::nodes::list(self.store.as_ref(), self.cfg.node_down_after).await?;
            // Only nodes this one can reach (a parsable address).
            nodes.retain(|n| {
                n.name == me
                    || n.address
                        .as_deref()
                        .is_some_and(|a| a.parse::<std::net::SocketAddr>().is_ok())
            });
            placement::least_loaded(&nodes, rec.vm.memory_mib, Some(me), None)
                .unwrap_or(me)
                .to_string()
        } else {
            me.to_string()
        };
        let to = to.as_str();
        let claim = Claim {
            id: vm_id,
            seen: rec.epoch,
            from: rec.vm.node.as_deref(),
            to,
            from_silent_for: rec.vm.node.as_ref().map(|_| self.cfg.node_down_after),
        };
        if !self.store.claim_vm(&claim).await? {
            return Ok(None);
        }
        for mut snap in snapshots {
            if snap.local {
                snap.local = false;
                self.store.save_snapshot(&snap).await?;
            }
        }
        self.peers.forget(vm_id);
        if to != me {
            tracing::info!(vm = %vm_id, from = ?rec.vm.node, node = %to, "placed a suspended vm of a lost node on another node");
            return Ok(Some(Claimed::Elsewhere));
        }
        if let Err(e) = std::fs::create_dir_all(self.paths(vm_id).dir) {
            tracing::warn!(vm = %vm_id, error = %e, "creating the vm's directory failed");
        }
        let rt = self.supervisor_or_insert(vm_id, || {
            VmSupervisor::new(vm_id.to_string(), rec.vm.state, Vec::new())
        });
        tracing::info!(vm = %vm_id, from = ?rec.vm.node, "claimed a suspended vm of a lost node");
        Ok(Some(Claimed::Here(rt)))
    }
}

impl VmManager {
    /// A VM another node handed to this one (`move`) has no runtime here
    /// yet: make it (the VM is suspended; its wake reads S3). Ok(None): the
    /// VM is not this node's.
    pub(crate) async fn attach_handed_over(
        &self,
        vm_id: &str,
    ) -> Result<Option<Arc<VmSupervisor>>, StoreError> {
        if let Ok(rt) = self.supervisor(vm_id) {
            return Ok(Some(rt));
        }
        let Some(rec) = self.store.get_vm(vm_id).await? else {
            return Ok(None);
        };
        // Attached here while the record was read (a request of this node's
        // own took it, and its wake already shows in the record).
        if let Ok(rt) = self.supervisor(vm_id) {
            return Ok(Some(rt));
        }
        if rec.vm.node.as_deref() != Some(self.cfg.node_name.as_str()) || rec.vm.state.has_process()
        {
            return Ok(None);
        }
        if let Err(e) = std::fs::create_dir_all(self.paths(vm_id).dir) {
            tracing::warn!(vm = %vm_id, error = %e, "creating the vm's directory failed");
        }
        let rt = self.supervisor_or_insert(vm_id, || {
            VmSupervisor::new(vm_id.to_string(), rec.vm.state, Vec::new())
        });
        tracing::info!(vm = %vm_id, state = %rec.vm.state, "took charge of a vm handed to this node");
        Ok(Some(rt))
    }
}

/// Where [`VmManager::adopt`] put a lost node's VM.
pub(crate) enum Claimed {
    /// This node: it wakes here.
    Here(Arc<VmSupervisor>),
    /// Another node (now in the VM's record): send the request there.
    Elsewhere,
}

/// States in which a lost node may have held the VM's only current state
/// (a stopped or failed VM stays with its node: its disk is there).
fn has_process_or_suspend(state: VmState) -> bool {
    !matches!(state, VmState::Stopped | VmState::Failed)
}
