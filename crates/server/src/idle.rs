//! Idle suspend: a running VM behind a route with `idle_timeout_seconds` is
//! suspended (`stop: true`, trigger `idle`) once no request has been in
//! flight for that long. Activity is per VM, so a VM with several routes is
//! idle only when all of them are (the longest timeout applies).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::manager::VmManager;
use crate::model::CreateSnapshot;

/// How often VMs are checked for idleness (the resolution of timeouts).
const IDLE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

impl VmManager {
    pub async fn idle_worker(self: Arc<Self>, shutdown: CancellationToken) {
        if self.storage.is_none() {
            // Suspending needs S3; routes may still set timeouts for later.
            return;
        }
        let mut tick = tokio::time::interval(IDLE_CHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.suspend_idle_vms().await;
        }
    }

    /// Start an idle suspend of every VM that has been idle long enough.
    async fn suspend_idle_vms(self: &Arc<Self>) {
        for rt in self.all_supervisors() {
            let Some(timeout) = self.routes.idle_timeout_of(&rt.id) else {
                continue;
            };
            // A VM still booting is not idle: requests wait for its app.
            if !rt.is_ready() || !rt.activity.claim_idle(timeout) {
                continue;
            }
            // Claimed: new requests are held from here on; the claim ends
            // when the capture does.
            let req = CreateSnapshot { stop: Some(true) };
            if let Err(e) = self.snapshot(&rt.id, req, "idle").await {
                rt.release_idle();
                tracing::debug!(vm = %rt.id, error = %e, "idle suspend not started");
            }
        }
    }
}
