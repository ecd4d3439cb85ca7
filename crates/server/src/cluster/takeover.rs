//! Lost nodes and their VMs. Every node checks, with each heartbeat, for
//! nodes not heard from for the down time, and takes over their VMs that had
//! a process: one with a ready snapshot in S3 becomes `snapshotted` from the
//! newest one (its `state_reason` says which, and that work since is gone),
//! one without becomes `failed`. Each takeover is a compare-and-set on the
//! VM's epoch, so exactly one node does it and a node that comes back late
//! cannot undo it. The next request (or `start`/`restore`) through any node
//! then claims the VM for that node ([`VmManager::adopt`]) and wakes it
//! there from S3.

use std::collections::HashSet;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::cluster::nodes::heartbeat_every;
use crate::manager::{VmManager, now_rfc3339};
use crate::model::{SnapshotStatus, VmEvent, VmState};
use crate::runtime::VmRuntime;
use crate::state::StoreError;

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

    /// One pass: every VM with a process on a node that is down.
    pub(crate) async fn take_over_lost_vms(&self) -> Result<(), StoreError> {
        let down_after = self.cfg.node_down_after;
        let lost: HashSet<String> = self
            .store
            .list_nodes()
            .await?
            .into_iter()
            .filter(|n| n.silent_for > down_after && n.name != self.cfg.node_name)
            .map(|n| n.name)
            .collect();
        if lost.is_empty() {
            return Ok(());
        }
        for rec in self.store.list_vms().await? {
            let Some(node) = rec.vm.node.as_deref() else {
                continue;
            };
            if !lost.contains(node) || !needs_takeover(rec.vm.state) {
                continue;
            }
            let newest_ready = self
                .store
                .list_snapshots(&rec.vm.id)
                .await?
                .into_iter()
                .find(|s| s.snap.status == SnapshotStatus::Ready);
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
            if !self
                .store
                .take_over_vm(&rec.vm.id, rec.epoch, state, &reason)
                .await?
            {
                continue; // another node did it first
            }
            tracing::warn!(vm = %rec.vm.id, lost = %node, %state, %reason, "took over a lost node's vm");
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

    /// Make this node the owner of a VM without a process whose node is down
    /// (suspended: so that it can wake here from S3; stopped or failed: so
    /// that it can be deleted, or started, though its disk was the lost
    /// node's): a compare-and-set on the VM's epoch
    /// (only one node wins; the others forward to it). The VM's local
    /// copies were the lost node's: its snapshots are marked as not local,
    /// so the wake reads S3. Ok(None): not claimable (another node won, or
    /// the VM is not suspended).
    pub(crate) async fn adopt(&self, vm_id: &str) -> Result<Option<Arc<VmRuntime>>, StoreError> {
        let Some(rec) = self.store.get_vm(vm_id).await? else {
            return Ok(None);
        };
        // A VM with a process is taken over first (takeover_worker).
        if needs_takeover(rec.vm.state) {
            return Ok(None);
        }
        // Only from a node that is down, as of the record just read (whose
        // epoch the claim compares): a node that claimed it meanwhile is up,
        // and keeps it.
        if let Some(owner) = rec.vm.node.as_deref() {
            let owner_up = self
                .store
                .list_nodes()
                .await?
                .into_iter()
                .any(|n| n.name == owner && n.silent_for <= self.cfg.node_down_after);
            if owner_up || owner == self.cfg.node_name {
                return Ok(None);
            }
        }
        if !self
            .store
            .claim_vm(vm_id, &self.cfg.node_name, rec.epoch)
            .await?
        {
            return Ok(None);
        }
        for mut snap in self.store.list_snapshots(vm_id).await? {
            if snap.local {
                snap.local = false;
                self.store.save_snapshot(&snap).await?;
            }
        }
        if let Err(e) = std::fs::create_dir_all(self.paths(vm_id).dir) {
            tracing::warn!(vm = %vm_id, error = %e, "creating the vm's directory failed");
        }
        let rt = self.runtime_or_insert(vm_id, || {
            VmRuntime::new(vm_id.to_string(), rec.vm.state, Vec::new())
        });
        self.peers.forget(vm_id);
        tracing::info!(vm = %vm_id, from = ?rec.vm.node, "claimed a suspended vm of a lost node");
        Ok(Some(rt))
    }
}

impl VmManager {
    /// A VM another node handed to this one (`move`) has no runtime here
    /// yet: make it (the VM is suspended; its wake reads S3). Ok(None): the
    /// VM is not this node's.
    pub(crate) async fn attach_handed_over(
        &self,
        vm_id: &str,
    ) -> Result<Option<Arc<VmRuntime>>, StoreError> {
        if let Ok(rt) = self.runtime(vm_id) {
            return Ok(Some(rt));
        }
        let Some(rec) = self.store.get_vm(vm_id).await? else {
            return Ok(None);
        };
        if rec.vm.node.as_deref() != Some(self.cfg.node_name.as_str()) || rec.vm.state.has_process()
        {
            return Ok(None);
        }
        if let Err(e) = std::fs::create_dir_all(self.paths(vm_id).dir) {
            tracing::warn!(vm = %vm_id, error = %e, "creating the vm's directory failed");
        }
        let rt = self.runtime_or_insert(vm_id, || {
            VmRuntime::new(vm_id.to_string(), rec.vm.state, Vec::new())
        });
        tracing::info!(vm = %vm_id, state = %rec.vm.state, "took charge of a vm handed to this node");
        Ok(Some(rt))
    }
}

/// States in which a lost node held the VM's only current state.
fn needs_takeover(state: VmState) -> bool {
    !matches!(
        state,
        VmState::Snapshotted | VmState::Stopped | VmState::Failed
    )
}
