//! Auto-wake: a proxied request for a VM that cannot serve right now (it is
//! suspended, being suspended, checkpointed or restored) is held until the VM
//! runs. However many requests arrive, one wake (restore) runs per VM; every
//! held request waits for its outcome, bounded in number and in time.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::{OpGuard, VmSupervisor};
use crate::model::VmState;

/// What a wake needs from the rest of the daemon: the node's lease, the
/// limits, a start (autostart of a stopped VM) and a restore. `VmManager`
/// implements it with QEMU, S3 and the state store; the tests below with a
/// fake.
#[async_trait::async_trait]
pub trait Lifecycle: Clone + Send + Sync + 'static {
    /// The node lost its lease: it serves nothing.
    fn fenced(&self) -> bool;
    /// How many requests may wait per VM, and for how long.
    fn wake_limits(&self) -> WakeLimits;
    /// Tasks shutdown waits for (the wake runs as one).
    fn tasks(&self) -> &TaskTracker;
    /// Start a stopped VM (a request's autostart). Fails while another
    /// operation holds it.
    async fn start(&self, vm: &Arc<VmSupervisor>) -> Result<(), String>;
    /// Restore a suspended VM under `guard` (the wake's operation lock).
    /// `since` is when the wake began (for its event). Ok once it runs; the
    /// reason otherwise.
    async fn restore(
        &self,
        vm: &Arc<VmSupervisor>,
        guard: OpGuard,
        since: std::time::Instant,
    ) -> Result<(), String>;
}

#[derive(Debug, Clone, Copy)]
pub struct WakeLimits {
    /// Requests held per VM at most.
    pub queue: usize,
    /// How long a held request waits for the VM.
    pub timeout: Duration,
}

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
fn booting(rt: &VmSupervisor, state: VmState) -> bool {
    state == VmState::Starting || (state == VmState::Running && !rt.is_ready())
}

/// Counts a held request; the count drops when the request stops waiting.
struct Held<'a>(&'a VmSupervisor);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Clears a VM's wake slot when dropped.
struct WakeSlot<'a>(&'a VmSupervisor);

impl Drop for WakeSlot<'_> {
    fn drop(&mut self) {
        *self.0.wake.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl VmSupervisor {
    /// The host port to forward a proxied request to, once the VM serves:
    /// at once if it runs and its app answers; after its boot if it is
    /// starting; after waking it if it is suspended (`auto_wake` routes,
    /// tracked requests only); after starting it if it is stopped (likewise,
    /// as Fly's autostart does). A tracked request counts as in flight from
    /// here on.
    pub async fn admit_or_wake<L: Lifecycle>(
        self: &Arc<Self>,
        core: &L,
        guest_port: u16,
        track: bool,
        auto_wake: bool,
    ) -> Result<u16, WakeError> {
        // A node that lost its lease serves nothing (its VMs are paused
        // and may be taken over).
        let rt = self;
        if core.fenced() {
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
        let WakeLimits {
            queue: limit,
            timeout,
        } = core.wake_limits();
        if rt.waiting.fetch_add(1, Ordering::Relaxed) >= limit {
            rt.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(WakeError::QueueFull(limit));
        }
        let _held = Held(rt);
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
                    if core.start(rt).await.is_err() {
                        tokio::select! {
                            _ = states.changed() => {}
                            () = tokio::time::sleep_until(deadline) => return Err(WakeError::Timeout(timeout)),
                        }
                    }
                    continue;
                }
                // Claimed by an idle suspend that has not begun its capture:
                // wait for it (it publishes its states, or drops the claim).
                // Starting a wake here would find the VM running and spin.
                VmState::Running if !booting && rt.activity.claimed_for_suspend() => {
                    tokio::select! {
                        _ = states.changed() => continue,
                        () = tokio::time::sleep_until(deadline) => return Err(WakeError::Timeout(timeout)),
                    }
                }
                // Running, ready, yet not admitted: the port is not
                // forwarded (waiting will not help), unless an idle claim
                // was dropped just now.
                VmState::Running if !booting => {
                    return rt
                        .admit(guest_port, track, false)
                        .ok_or(WakeError::NotRunning(state));
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
            let mut wake = rt.wake(core);
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
    fn wake<L: Lifecycle>(self: &Arc<Self>, core: &L) -> WakeWatch {
        let rt = self;
        let mut slot = rt.wake.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = slot.as_ref() {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(None);
        *slot = Some(rx.clone());
        drop(slot);
        let (core, rt) = (core.clone(), rt.clone());
        let since = std::time::Instant::now();
        let tasks = core.tasks().clone();
        tasks.spawn(async move {
            // Frees the slot however the task ends (even by a panic), so
            // that a later request can start a new wake.
            let _slot = WakeSlot(&rt);
            let result = rt.run_wake(&core, since).await;
            *rt.wake_failure.lock().unwrap_or_else(|p| p.into_inner()) =
                result.as_ref().err().map(|e| (Instant::now(), e.clone()));
            *rt.wake.lock().unwrap_or_else(|p| p.into_inner()) = None;
            let _ = tx.send(Some(result));
        });
        rx
    }

    /// Wait for the operation in progress (a suspend finishing, a restore),
    /// then restore the VM if it is suspended.
    async fn run_wake<L: Lifecycle>(
        self: &Arc<Self>,
        core: &L,
        since: std::time::Instant,
    ) -> Result<(), String> {
        let rt = self;
        let mut states = rt.watch_state();
        loop {
            let guard = rt.begin("wake").await;
            states.borrow_and_update();
            match rt.state() {
                VmState::Running => return Ok(()),
                VmState::Snapshotted => return core.restore(rt, guard, since).await,
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

#[cfg(test)]
mod tests {
    //! The wake's rules with a fake core and paused time: one restore per
    //! wake however many requests, failures answered fast for a while,
    //! bounded waits and queues, the lease, autostart, and the idle claim.

    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    use hatch_vmm::PortForward;
    use tokio::sync::Notify;

    use super::*;

    const PORT: u16 = 8080;
    const HOST_PORT: u16 = 40_000;

    #[derive(Clone, Default)]
    struct Fake(Arc<FakeInner>);

    #[derive(Default)]
    struct FakeInner {
        tasks: TaskTracker,
        fenced: AtomicBool,
        restores: AtomicUsize,
        starts: AtomicUsize,
        /// The next restores' outcome (Ok by default).
        fail_with: Mutex<Option<String>>,
        /// Restores wait for this when set (a restore that hangs).
        hang: AtomicBool,
        /// Two held requests at most instead of 64.
        small_queue: AtomicBool,
        never: Notify,
    }

    impl Fake {
        fn restores(&self) -> usize {
            self.0.restores.load(Ordering::SeqCst)
        }
        fn fail_with(&self, why: Option<&str>) {
            *self.0.fail_with.lock().unwrap() = why.map(str::to_string);
        }
    }

    /// The VM comes up: running, its app answers, its port forwarded.
    fn bring_up(vm: &VmSupervisor) {
        let mut inner = vm.lock();
        inner.forwards = vec![PortForward {
            host: HOST_PORT,
            guest: PORT,
        }];
        inner.ready = true;
        vm.publish_state(&mut inner, VmState::Running);
    }

    fn set_state(vm: &VmSupervisor, to: VmState) {
        let mut inner = vm.lock();
        vm.publish_state(&mut inner, to);
    }

    #[async_trait::async_trait]
    impl Lifecycle for Fake {
        fn fenced(&self) -> bool {
            self.0.fenced.load(Ordering::SeqCst)
        }
        fn wake_limits(&self) -> WakeLimits {
            WakeLimits {
                queue: if self.0.small_queue.load(Ordering::SeqCst) {
                    2
                } else {
                    64
                },
                timeout: Duration::from_secs(30),
            }
        }
        fn tasks(&self) -> &TaskTracker {
            &self.0.tasks
        }
        async fn start(&self, vm: &Arc<VmSupervisor>) -> Result<(), String> {
            self.0.starts.fetch_add(1, Ordering::SeqCst);
            bring_up(vm);
            Ok(())
        }
        async fn restore(
            &self,
            vm: &Arc<VmSupervisor>,
            _guard: OpGuard,
            _since: std::time::Instant,
        ) -> Result<(), String> {
            self.0.restores.fetch_add(1, Ordering::SeqCst);
            set_state(vm, VmState::Restoring);
            // A restore takes a while: requests arriving meanwhile join it.
            tokio::time::sleep(Duration::from_millis(200)).await;
            if self.0.hang.load(Ordering::SeqCst) {
                self.0.never.notified().await;
            }
            let failure = self.0.fail_with.lock().unwrap().clone();
            match failure {
                Some(why) => {
                    set_state(vm, VmState::Snapshotted);
                    Err(why)
                }
                None => {
                    bring_up(vm);
                    Ok(())
                }
            }
        }
    }

    fn suspended() -> Arc<VmSupervisor> {
        VmSupervisor::new("vm-test".into(), VmState::Snapshotted, Vec::new())
    }

    async fn request(vm: &Arc<VmSupervisor>, core: &Fake) -> Result<u16, WakeError> {
        vm.admit_or_wake(core, PORT, true, true).await
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_share_one_restore() {
        let (vm, core) = (suspended(), Fake::default());
        let held: Vec<_> = (0..50)
            .map(|_| {
                let (vm, core) = (vm.clone(), core.clone());
                tokio::spawn(async move { request(&vm, &core).await })
            })
            .collect();
        for h in held {
            assert_eq!(h.await.unwrap(), Ok(HOST_PORT));
        }
        assert_eq!(core.restores(), 1);
        assert_eq!(vm.activity.inflight(), 50);
        assert_eq!(vm.waiting.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_wake_is_answered_fast_then_retried() {
        let (vm, core) = (suspended(), Fake::default());
        core.fail_with(Some("snapshot storage unreachable"));
        let (a, b) = tokio::join!(request(&vm, &core), request(&vm, &core));
        let failed = Err(WakeError::Failed("snapshot storage unreachable".into()));
        assert_eq!((a, b.clone()), (failed.clone(), failed.clone()));
        assert_eq!(core.restores(), 1);

        // Within the retry pause: no second restore that would fail alike.
        core.fail_with(None);
        tokio::time::advance(WAKE_RETRY_AFTER - Duration::from_millis(300)).await;
        assert_eq!(request(&vm, &core).await, failed);
        assert_eq!(core.restores(), 1);

        tokio::time::advance(Duration::from_millis(300)).await;
        assert_eq!(request(&vm, &core).await, Ok(HOST_PORT));
        assert_eq!(core.restores(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_request_gives_up_after_the_wake_timeout() {
        let (vm, core) = (suspended(), Fake::default());
        core.0.hang.store(true, Ordering::SeqCst);
        let started = Instant::now();
        assert_eq!(
            request(&vm, &core).await,
            Err(WakeError::Timeout(Duration::from_secs(30)))
        );
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert_eq!(vm.waiting.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn held_requests_are_bounded() {
        let (vm, core) = (suspended(), Fake::default());
        core.0.small_queue.store(true, Ordering::SeqCst);
        core.0.hang.store(true, Ordering::SeqCst);
        for _ in 0..2 {
            let (vm, core) = (vm.clone(), core.clone());
            tokio::spawn(async move { vm.admit_or_wake(&core, PORT, true, true).await });
        }
        while vm.waiting.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            vm.admit_or_wake(&core, PORT, true, true).await,
            Err(WakeError::QueueFull(2))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_fenced_node_serves_nothing() {
        let (vm, core) = (suspended(), Fake::default());
        bring_up(&vm);
        core.0.fenced.store(true, Ordering::SeqCst);
        assert!(matches!(
            request(&vm, &core).await,
            Err(WakeError::Failed(_))
        ));
        assert_eq!(vm.activity.inflight(), 0);
        core.0.fenced.store(false, Ordering::SeqCst);
        assert_eq!(request(&vm, &core).await, Ok(HOST_PORT));
    }

    #[tokio::test(start_paused = true)]
    async fn only_tracked_requests_on_waking_routes_wake() {
        let (vm, core) = (suspended(), Fake::default());
        let untracked = vm.admit_or_wake(&core, PORT, false, true).await;
        let no_wake = vm.admit_or_wake(&core, PORT, true, false).await;
        let not_running = Err(WakeError::NotRunning(VmState::Snapshotted));
        assert_eq!((untracked, no_wake), (not_running.clone(), not_running));
        assert_eq!(core.restores(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopped_vm_is_started_by_a_request() {
        let vm = VmSupervisor::new("vm-test".into(), VmState::Stopped, Vec::new());
        let core = Fake::default();
        assert_eq!(request(&vm, &core).await, Ok(HOST_PORT));
        assert_eq!(core.0.starts.load(Ordering::SeqCst), 1);
        assert_eq!(core.restores(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_wait_for_a_booting_app() {
        let vm = VmSupervisor::new("vm-test".into(), VmState::Starting, Vec::new());
        let core = Fake::default();
        let held = {
            let (vm, core) = (vm.clone(), core.clone());
            tokio::spawn(async move { request(&vm, &core).await })
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!held.is_finished());
        bring_up(&vm);
        assert_eq!(held.await.unwrap(), Ok(HOST_PORT));
        assert_eq!(core.restores(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_claim_needs_quiet_and_holds_new_requests() {
        let (vm, core) = (suspended(), Fake::default());
        bring_up(&vm);
        let idle = Duration::from_secs(60);
        vm.activity.touch();
        assert!(!vm.activity.claim_idle(idle), "not idle yet");

        // A request in flight keeps the VM busy however long it takes.
        assert_eq!(request(&vm, &core).await, Ok(HOST_PORT));
        tokio::time::advance(idle * 2).await;
        assert!(!vm.activity.claim_idle(idle), "a request is in flight");
        vm.activity.end();
        tokio::time::advance(idle - Duration::from_secs(1)).await;
        assert!(
            !vm.activity.claim_idle(idle),
            "the clock restarted at its end"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(vm.activity.claim_idle(idle));
        assert!(!vm.activity.claim_idle(idle), "claimed once");

        // Claimed: a request is held, not admitted; once the suspend ends
        // it wakes the VM.
        assert_eq!(vm.admit(PORT, true, false), None);
        let held = {
            let (vm, core) = (vm.clone(), core.clone());
            tokio::spawn(async move { request(&vm, &core).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!held.is_finished());
        set_state(&vm, VmState::Snapshotted);
        vm.release_idle();
        assert_eq!(held.await.unwrap(), Ok(HOST_PORT));
        assert_eq!(core.restores(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_idle_claim_lets_held_requests_in() {
        let (vm, core) = (suspended(), Fake::default());
        bring_up(&vm);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(vm.activity.claim_idle(Duration::from_secs(5)));
        let held = {
            let (vm, core) = (vm.clone(), core.clone());
            tokio::spawn(async move { request(&vm, &core).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!held.is_finished());
        // The suspend could not start (say, another operation held the VM).
        vm.release_idle();
        assert_eq!(held.await.unwrap(), Ok(HOST_PORT));
        assert_eq!(core.restores(), 0);
    }
}
