//! The in-memory side of one VM: its lifecycle state (mirrored in the state store), its
//! port forwards, its QEMU machine, and the lock that serializes operations.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hatch_vmm::{Machine, PortForward};
use tokio::sync::{OwnedMutexGuard, watch};

use crate::error::ApiError;
use crate::model::VmState;

pub struct VmRuntime {
    pub id: String,
    /// Proxied traffic to this VM.
    pub activity: Activity,
    /// The lifecycle state, for waiters (held requests of an auto-wake).
    state_tx: watch::Sender<VmState>,
    /// The wake in flight, if any (single-flight: requests share it).
    pub wake: Mutex<Option<crate::wake::WakeWatch>>,
    /// Proxied requests held while the VM wakes (bounded).
    pub waiting: std::sync::atomic::AtomicUsize,
    /// When the last wake failed and why: requests fail fast for a while
    /// instead of starting one failing restore after another.
    pub wake_failure: Mutex<Option<(Instant, String)>>,
    /// Degradations of the operation under way (a wake), for its event.
    pub warnings: Mutex<Vec<String>>,
    /// Held for the whole of an operation (boot, stop, delete, ...). Taken with
    /// `try_lock`: a second operation on a busy VM is answered 409 at once.
    op: Arc<tokio::sync::Mutex<()>>,
    /// Serializes state changes: held across the write to the state store
    /// so that the stored state and the published one change in one order.
    pub(crate) transitions: tokio::sync::Mutex<()>,
    // A std Mutex: held only to read or swap a field, never across an await.
    inner: Mutex<Inner>,
}

pub struct Inner {
    pub state: VmState,
    pub forwards: Vec<PortForward>,
    pub machine: Option<Arc<Machine>>,
    /// Connection to the guest agent, held open while the VM runs.
    pub agent: Option<hatch_vmm::agent::Agent>,
    /// The operation holding `op`, for the 409 message.
    pub busy_with: Option<&'static str>,
    /// The guest's app answers: false from a cold boot until the boot probe
    /// sees an HTTP answer on a forwarded port. Requests wait for it.
    pub ready: bool,
    /// Host ports this VM's guest ports were last forwarded from: reused
    /// while free, so direct access survives a restart or a wake.
    pub last_ports: Vec<PortForward>,
}

/// Proxied requests in flight, the time of the last request event, and
/// whether an idle suspend has claimed the VM (no new requests go in).
pub struct Activity {
    inner: Mutex<ActivityInner>,
}

struct ActivityInner {
    inflight: u64,
    last: Instant,
    suspending: bool,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            inner: Mutex::new(ActivityInner {
                inflight: 0,
                last: Instant::now(),
                suspending: false,
            }),
        }
    }
}

impl Activity {
    fn lock(&self) -> MutexGuard<'_, ActivityInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Restart the idle clock (a request, or the VM just started running).
    pub fn touch(&self) {
        self.lock().last = Instant::now();
    }

    /// A tracked request is over.
    pub fn end(&self) {
        let mut a = self.lock();
        // Saturating: never wrap below zero, whatever happened in between.
        a.inflight = a.inflight.saturating_sub(1);
        a.last = Instant::now();
    }

    pub fn inflight(&self) -> u64 {
        self.lock().inflight
    }

    /// Claim the VM for an idle suspend if nothing is in flight and nothing
    /// happened for `timeout`. From then on requests are held, not admitted.
    pub fn claim_idle(&self, timeout: Duration) -> bool {
        let mut a = self.lock();
        if a.suspending || a.inflight > 0 || a.last.elapsed() < timeout {
            return false;
        }
        a.suspending = true;
        true
    }

    pub fn claimed_for_suspend(&self) -> bool {
        self.lock().suspending
    }

    /// The idle suspend is over (done or given up).
    fn release_idle(&self) {
        self.lock().suspending = false;
    }
}

/// Proof that the holder runs the only operation on a VM.
pub struct OpGuard {
    _guard: OwnedMutexGuard<()>,
    rt: Arc<VmRuntime>,
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        self.rt.lock().busy_with = None;
        // Requests waiting to start the VM (autostart) look again.
        self.rt.state_tx.send_modify(|_| {});
    }
}

impl VmRuntime {
    pub fn new(id: String, state: VmState, forwards: Vec<PortForward>) -> Arc<VmRuntime> {
        Arc::new(VmRuntime {
            id,
            activity: Activity::default(),
            state_tx: watch::Sender::new(state),
            wake: Mutex::new(None),
            waiting: Default::default(),
            wake_failure: Mutex::new(None),
            warnings: Mutex::default(),
            op: Arc::default(),
            transitions: tokio::sync::Mutex::new(()),
            inner: Mutex::new(Inner {
                state,
                machine: None,
                agent: None,
                busy_with: None,
                // Re-adopted at start: a guest that ran (or was being
                // checkpointed) served before; a starting one is probed.
                ready: matches!(state, VmState::Running | VmState::Snapshotting),
                last_ports: forwards.clone(),
                forwards,
            }),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> VmState {
        self.lock().state
    }

    /// Record a new state (the caller holds `inner`) and tell waiters.
    /// Lock order is `activity` before `inner` (see [`VmRuntime::admit`]):
    /// nothing here may take `activity`.
    pub fn publish_state(&self, inner: &mut Inner, to: VmState) {
        inner.state = to;
        self.state_tx.send_replace(to);
    }

    /// The idle suspend claim is over (done or given up); requests held
    /// because of it look again.
    pub fn release_idle(&self) {
        self.activity.release_idle();
        self.state_tx.send_modify(|_| {});
    }

    pub fn watch_state(&self) -> watch::Receiver<VmState> {
        self.state_tx.subscribe()
    }

    /// Admit a proxied request to `guest_port` if the VM serves now: running
    /// (and ready, unless `unready_ok`), not claimed by an idle suspend, the
    /// port forwarded. Returns the host port. A tracked request counts as in
    /// flight from here on.
    pub fn admit(&self, guest_port: u16, track: bool, unready_ok: bool) -> Option<u16> {
        let mut act = self.activity.lock();
        if act.suspending {
            return None;
        }
        let host = {
            let inner = self.lock();
            if inner.state != VmState::Running || !(inner.ready || unready_ok) {
                return None;
            }
            inner.forwards.iter().find(|f| f.guest == guest_port)?.host
        };
        if track {
            act.inflight += 1;
            act.last = Instant::now();
        }
        Some(host)
    }

    pub fn is_ready(&self) -> bool {
        let inner = self.lock();
        inner.state == VmState::Running && inner.ready
    }

    /// Record whether the guest's app answers, and tell held requests.
    pub fn set_ready(&self, ready: bool) {
        if ready {
            // The idle clock starts when the app can be reached.
            self.activity.touch();
        }
        self.lock().ready = ready;
        self.state_tx.send_modify(|_| {});
    }

    /// Note a degradation of the operation under way (and log it).
    pub fn warn(&self, what: String) {
        tracing::warn!(vm = %self.id, "{what}");
        self.warnings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(what);
    }

    /// The degradations noted since the last call.
    pub fn take_warnings(&self) -> Vec<String> {
        std::mem::take(&mut *self.warnings.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn machine(&self) -> Option<Arc<Machine>> {
        self.lock().machine.clone()
    }

    /// Start operation `what`, or fail with 409 if another one runs.
    pub fn try_begin(self: &Arc<Self>, what: &'static str) -> Result<OpGuard, ApiError> {
        match self.op.clone().try_lock_owned() {
            Ok(guard) => {
                self.lock().busy_with = Some(what);
                Ok(OpGuard {
                    _guard: guard,
                    rt: self.clone(),
                })
            }
            Err(_) => {
                let busy = self.lock().busy_with.unwrap_or("another operation");
                Err(ApiError::conflict(format!(
                    "vm '{}' is busy: {busy} is in progress",
                    self.id
                )))
            }
        }
    }

    /// Wait for the running operation, if any, then start `what`.
    pub async fn begin(self: &Arc<Self>, what: &'static str) -> OpGuard {
        let guard = self.op.clone().lock_owned().await;
        self.lock().busy_with = Some(what);
        OpGuard {
            _guard: guard,
            rt: self.clone(),
        }
    }
}
