//! Auto-wake: a proxied request for a VM that cannot serve right now (it is
//! suspended, being suspended, checkpointed or restored) is held until the VM
//! runs. However many requests arrive, one wake (restore) runs per VM; every
//! held request waits for its outcome, bounded in number and in time.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::manager::VmManager;
use crate::model::VmState;
use crate::runtime::VmRuntime;
use crate::snapshot::WakeCause;

/// Outcome of a wake, shared by every request it holds: `None` while it runs.
pub type WakeWatch = watch::Receiver<Option<Result<(), String>>>;

/// After a failed wake, requests are answered 503 at once for this long
/// rather than each starting another restore that fails the same way.
pub const WAKE_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Why a held request cannot be forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WakeError {
    /// The VM is not running and will not be woken (stopped, or the route
    /// does not auto-wake).
    NotRunning(VmState),
    /// The wake failed (the VM stays restorable).
    Failed(String),
    /// The VM did not come up within the wake timeout.
    Timeout(Duration),
    /// Too many requests are already held for this VM.
    QueueFull(usize),
}

/// A VM on its way up by a boot: held requests wait for its app to answer.
fn booting(rt: &VmRuntime, state: VmState) -> bool {
    state == VmState::Starting || (state == VmState::Running && !rt.is_ready())
}

/// Counts a held request; the count drops when the request stops waiting.
struct Held<'a>(&'a VmRuntime);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Clears a VM's wake slot when dropped.
struct WakeSlot<'a>(&'a VmRuntime);

impl Drop for WakeSlot<'_> {
    fn drop(&mut self) {
        *self.0.wake.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl VmManager {
    /// The host port to forward a proxied request to, once the VM serves:
    /// at once if it runs and its app answers; after its boot if it is
    /// starting; after waking it if it is suspended (`auto_wake` routes,
    /// tracked requests only); after starting it if it is stopped (likewise,
    /// as Fly's autostart does). A tracked request counts as in flight from
    /// here on.
    pub async fn admit_or_wake(
        self: &Arc<Self>,
        rt: &Arc<VmRuntime>,
        guest_port: u16,
        track: bool,
        auto_wake: bool,
    ) -> Result<u16, WakeError> {
        // A node that lost its lease serves nothing (its VMs are paused
        // and may be taken over).
        if self.fenced() {
            return Err(WakeError::Failed(
                "this node cannot reach the state database; its vms are paused".into(),
            ));
        }
        if let Some(port) = rt.admit(guest_port, track, false) {
            return Ok(port);
        }
        let wakes = auto_wake && track;
        let state = rt.state();
        if !wakes && !booting(rt, state) {
            return Err(WakeError::NotRunning(state));
        }
        if matches!(state, VmState::Stopping | VmState::Failed) {
            return Err(WakeError::NotRunning(state));
        }
        let limit = self.cfg.wake_queue;
        if rt.waiting.fetch_add(1, Ordering::Relaxed) >= limit {
            rt.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(WakeError::QueueFull(limit));
        }
        let _held = Held(rt);
        let timeout = self.cfg.wake_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut states = rt.watch_state();
        loop {
            states.borrow_and_update();
            if let Some(port) = rt.admit(guest_port, track, false) {
                return Ok(port);
            }
            let state = rt.state();
            let booting = booting(rt, state);
            match state {
                VmState::Stopping | VmState::Failed => return Err(WakeError::NotRunning(state)),
                VmState::Stopped if !wakes => return Err(WakeError::NotRunning(state)),
                VmState::Stopped => {
                    // Autostart. Refused only while another operation holds
                    // the VM (another request's start, a delete): see what
                    // it leads to.
                    if self.start(&rt.id).await.is_err() {
                        tokio::select! {
                            _ = states.changed() => {}
                            () = tokio::time::sleep_until(deadline) => return Err(WakeError::Timeout(timeout)),
                        }
                    }
                    continue;
                }
                // Running, ready, yet not admitted and not claimed by a
                // suspend: the port is not forwarded; waiting will not help.
                VmState::Running if !booting && !rt.activity.claimed_for_suspend() => {
                    return Err(WakeError::NotRunning(state));
                }
                _ => {}
            }
            if booting {
                // The boot probe says when the app answers.
                tokio::select! {
                    _ = states.changed() => continue,
                    () = tokio::time::sleep_until(deadline) => {
                        // An app that never answers the probe's HTTP (not
                        // an HTTP server?) gets its requests anyway.
                        return rt
                            .admit(guest_port, track, true)
                            .ok_or(WakeError::Timeout(timeout));
                    }
                }
            }
            if !wakes {
                return Err(WakeError::NotRunning(state));
            }
            if state == VmState::Snapshotted
                && rt.wake.lock().unwrap_or_else(|p| p.into_inner()).is_none()
                && let Some((at, why)) = rt
                    .wake_failure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                && at.elapsed() < WAKE_RETRY_AFTER
            {
                return Err(WakeError::Failed(why));
            }
            let mut wake = self.wake(rt);
            tokio::select! {
                outcome = wake.wait_for(Option::is_some) => match outcome {
                    Ok(outcome) => {
                        if let Some(Err(why)) = outcome.as_ref() {
                            return Err(WakeError::Failed(why.clone()));
                        }
                    }
                    Err(_) => return Err(WakeError::Failed("the wake ended unexpectedly".into())),
                },
                // A state change (e.g. a checkpoint ended) may admit us first.
                _ = states.changed() => {}
                () = tokio::time::sleep_until(deadline) => return Err(WakeError::Timeout(timeout)),
            }
        }
    }

    /// Join the wake in flight for this VM, or start one.
    fn wake(self: &Arc<Self>, rt: &Arc<VmRuntime>) -> WakeWatch {
        let mut slot = rt.wake.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = slot.as_ref() {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(None);
        *slot = Some(rx.clone());
        drop(slot);
        let (this, rt) = (self.clone(), rt.clone());
        let since = Instant::now();
        self.tasks.spawn(async move {
            // Frees the slot however the task ends (even by a panic), so
            // that a later request can start a new wake.
            let _slot = WakeSlot(&rt);
            let result = this.run_wake(&rt, since).await;
            *rt.wake_failure.lock().unwrap_or_else(|p| p.into_inner()) =
                result.as_ref().err().map(|e| (Instant::now(), e.clone()));
            *rt.wake.lock().unwrap_or_else(|p| p.into_inner()) = None;
            let _ = tx.send(Some(result));
        });
        rx
    }

    /// Wait for the operation in progress (a suspend finishing, a restore),
    /// then restore the VM if it is suspended.
    async fn run_wake(self: &Arc<Self>, rt: &Arc<VmRuntime>, since: Instant) -> Result<(), String> {
        let store = self.storage.clone();
        let mut states = rt.watch_state();
        loop {
            let guard = rt.begin("wake").await;
            states.borrow_and_update();
            match rt.state() {
                VmState::Running => return Ok(()),
                VmState::Snapshotted => {
                    let (rec, prior) = self
                        .begin_restore(rt, None)
                        .await
                        .map_err(|e| e.to_string())?;
                    let cause = WakeCause {
                        trigger: "request",
                        since,
                    };
                    self.clone()
                        .run_restore(rt.clone(), guard, rec, prior, store, cause)
                        .await;
                    return match rt.state() {
                        VmState::Running => Ok(()),
                        state => Err(self
                            .get(&rt.id)
                            .await
                            .ok()
                            .and_then(|vm| vm.state_reason)
                            .unwrap_or_else(|| format!("vm is {state}"))),
                    };
                }
                state @ (VmState::Stopped | VmState::Failed) => {
                    return Err(format!("vm is {state}"));
                }
                // Starting, restoring, stopping or snapshotting without the
                // operation lock: wait for its next state.
                _ => {
                    drop(guard);
                    if states.changed().await.is_err() {
                        return Err("vm was deleted".into());
                    }
                }
            }
        }
    }
}
