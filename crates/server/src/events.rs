//! What happened to a VM, for people watching it: wakes (their latency and
//! trigger) and idle suspends. Each is a row in `vm_events`
//! (`GET /vms/{id}/events`), a metric, and a log line.

use crate::error::ApiError;
use crate::manager::{VmManager, now_rfc3339};
use crate::model::VmEvent;
use crate::snapshot::WakeCause;

impl VmManager {
    /// A suspended VM was restored (or failed to be).
    pub(crate) async fn record_wake(
        &self,
        vm_id: &str,
        cause: WakeCause,
        snapshot_id: &str,
        error: Option<String>,
        warnings: Vec<String>,
    ) {
        let elapsed = cause.since.elapsed();
        let ms = elapsed.as_millis() as u64;
        let result = if error.is_none() { "ok" } else { "failed" };
        self.metrics.record_wake(cause.trigger, result, elapsed);
        if error.is_none() {
            self.metrics.record_vm_wake(vm_id, elapsed);
        }
        match &error {
            None => {
                tracing::info!(vm = %vm_id, trigger = cause.trigger, snapshot = %snapshot_id, wake_ms = ms, "woke")
            }
            Some(e) => {
                tracing::warn!(vm = %vm_id, trigger = cause.trigger, snapshot = %snapshot_id, wake_ms = ms, error = %e, "wake failed")
            }
        }
        self.add_event(VmEvent {
            vm_id: vm_id.to_string(),
            at: now_rfc3339(),
            kind: "wake".into(),
            trigger: cause.trigger.into(),
            duration_ms: Some(ms),
            snapshot_id: Some(snapshot_id.to_string()),
            error,
            warnings,
        })
        .await;
    }

    /// An idle VM was suspended (or the attempt failed).
    pub(crate) async fn record_idle_suspend(
        &self,
        vm_id: &str,
        snapshot_id: &str,
        pause_ms: Option<u64>,
        error: Option<String>,
    ) {
        let result = if error.is_none() { "ok" } else { "failed" };
        self.metrics.record_idle_suspend(result);
        match &error {
            None => tracing::info!(vm = %vm_id, snapshot = %snapshot_id, "suspended for idleness"),
            Some(e) => {
                tracing::warn!(vm = %vm_id, snapshot = %snapshot_id, error = %e, "idle suspend failed")
            }
        }
        self.add_event(VmEvent {
            vm_id: vm_id.to_string(),
            at: now_rfc3339(),
            kind: "idle_suspend".into(),
            trigger: "idle".into(),
            duration_ms: pause_ms,
            snapshot_id: Some(snapshot_id.to_string()),
            error,
            warnings: Vec::new(),
        })
        .await;
    }

    async fn add_event(&self, event: VmEvent) {
        if let Err(e) = self.store.add_event(&event).await {
            tracing::warn!(vm = %event.vm_id, error = %e, "recording event failed");
        }
    }

    /// A VM's events, newest first.
    pub async fn events(&self, vm_id: &str) -> Result<Vec<VmEvent>, ApiError> {
        self.known_vm(vm_id).await?;
        Ok(self.store.list_events(vm_id).await?)
    }
}
