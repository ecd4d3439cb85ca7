//! `POST /vms/{id}/move {to}` (`hatch vm move VM --to NODE`): the node that
//! runs the VM suspends it, waits until the suspend is in S3, hands the VM
//! to the target (a compare-and-set on its epoch), lets go of its own copy,
//! and asks the target to wake it (unless `start: false`). The target
//! restores from S3. `hatch node drain` moves every VM off a node this way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::ApiError;
use crate::manager::VmManager;
use crate::model::{CreateSnapshot, SnapshotStatus, Vm, VmState};

/// Longest a move waits for its suspend to reach S3.
const UPLOAD_PATIENCE: Duration = Duration::from_secs(600);
const POLL: Duration = Duration::from_millis(50);

impl VmManager {
    /// Hand VM `id` (run by this node) to node `to`; answers the VM record
    /// once it belongs to `to` (still `snapshotted`).
    pub async fn move_vm(self: &Arc<Self>, id: &str, to: &str) -> Result<Vm, ApiError> {
        self.storage()?;
        let rt = self.supervisor(id)?;
        if to == self.cfg.node_name {
            return Err(ApiError::invalid(format!(
                "vm '{id}' already runs on node '{to}'"
            )));
        }
        let target = crate::cluster::nodes::list(self.store.as_ref(), self.cfg.node_down_after)
            .await?
            .into_iter()
            .find(|n| n.name == to)
            .ok_or_else(|| ApiError::not_found("node", to))?;
        if target.state != "up" {
            return Err(ApiError::conflict(format!(
                "node '{to}' is {}; a vm can move only to a node that is up",
                target.state
            )));
        }
        if target.address.is_none() || self.hop.is_none() {
            return Err(ApiError::conflict(format!(
                "node '{to}' cannot be reached from here (both need --cluster-addr and HATCH_CLUSTER_SECRET)"
            )));
        }
        let suspend = match rt.state() {
            VmState::Running => Some(
                self.snapshot(id, CreateSnapshot { stop: Some(true) }, "move")
                    .await?
                    .id,
            ),
            VmState::Snapshotted => None,
            state => {
                return Err(ApiError::conflict(format!(
                    "vm '{id}' is {state}; only a running or suspended vm can move"
                )));
            }
        };
        self.wait_until_in_s3(&rt.id, suspend.as_deref()).await?;
        let _guard = rt.try_begin("move").await?;
        if rt.state() != VmState::Snapshotted {
            return Err(ApiError::conflict(format!(
                "vm '{id}' changed while moving (it is {}); nothing was moved",
                rt.state()
            )));
        }
        let rec = self
            .store
            .get_vm(id)
            .await?
            .ok_or_else(|| ApiError::not_found("vm", id))?;
        let claim = crate::state::Claim {
            id,
            seen: rec.epoch,
            from: Some(self.cfg.node_name.as_str()),
            to,
            from_silent_for: None,
        };
        if !self.store.claim_vm(&claim).await? {
            return Err(ApiError::conflict(format!(
                "vm '{id}' changed owner while moving; nothing was moved"
            )));
        }
        // The target restores from S3: the local copies here are not its,
        // and what never reached S3 cannot follow the VM.
        for mut snap in self.store.list_snapshots(id).await? {
            let dir = self.snapshot_dir(&snap.snap.id);
            if !matches!(
                snap.snap.status,
                SnapshotStatus::Ready | SnapshotStatus::Failed
            ) {
                snap.snap.status = SnapshotStatus::Failed;
                snap.snap.error = Some(format!(
                    "the vm moved to node '{to}' before this snapshot reached S3"
                ));
            }
            snap.local = false;
            if let Err(e) = self.store.save_snapshot(&snap).await {
                tracing::warn!(snapshot = %snap.snap.id, error = %anyhow::Error::from(e), "recording a moved vm's snapshot failed");
            }
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        }
        self.forget_supervisor(id);
        let _ = std::fs::remove_dir_all(self.paths(id).dir);
        self.peers.forget(id);
        tracing::info!(vm = %id, to, "vm handed to another node");
        self.get(id).await
    }

    /// Wait until the VM is suspended and what it restores from is `ready`
    /// (in S3): the suspend `suspend` this move started, or else the newest
    /// snapshot once its upload is over.
    async fn wait_until_in_s3(&self, id: &str, suspend: Option<&str>) -> Result<(), ApiError> {
        let rt = self.supervisor(id)?;
        let started = Instant::now();
        loop {
            let snaps = self.store.list_snapshots(id).await?;
            let state = rt.state();
            let target = match suspend {
                Some(sid) => snaps.iter().find(|s| s.snap.id == sid),
                None => snaps.first(),
            };
            match target.map(|s| (s.snap.status, s.snap.error.clone())) {
                Some((SnapshotStatus::Ready, _)) if state == VmState::Snapshotted => return Ok(()),
                Some((SnapshotStatus::Failed, error)) if suspend.is_some() => {
                    return Err(ApiError::conflict(format!(
                        "the suspend for the move failed: {}; nothing was moved",
                        error.unwrap_or_default()
                    )));
                }
                // An older snapshot in S3 is what a wake elsewhere restores.
                Some((SnapshotStatus::Failed, _))
                    if state == VmState::Snapshotted
                        && snaps.iter().any(|s| s.snap.status == SnapshotStatus::Ready) =>
                {
                    return Ok(());
                }
                None if suspend.is_none() => {
                    return Err(ApiError::conflict(format!(
                        "vm '{id}' has no snapshot in S3 to move with"
                    )));
                }
                _ => {}
            }
            if suspend.is_none() && state != VmState::Snapshotted {
                return Err(ApiError::conflict(format!(
                    "vm '{id}' became {state} while moving; nothing was moved"
                )));
            }
            if started.elapsed() > UPLOAD_PATIENCE {
                return Err(ApiError::conflict(format!(
                    "the suspend of vm '{id}' did not reach S3 within {} s; it stays here, suspended",
                    UPLOAD_PATIENCE.as_secs()
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}
