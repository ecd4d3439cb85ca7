//! One VM's supervisor: the in-memory side of its state machine (mirrored
//! in the state store, published to waiters), its operation lock (one
//! operation at a time; a second is refused or waits), its port forwards and
//! QEMU machine, the idle claim ([`Activity`]) and the single-flight wake
//! ([`wake`]). The core (`VmManager`) drives QEMU, S3 and the database
//! through it; the wake logic reaches them only through [`wake::Lifecycle`],
//! so it is unit-tested with a fake and paused time.

mod activity;
pub mod standby;
pub mod wake;

use std::sync::{Arc, Mutex, MutexGuard};

pub use activity::Activity;
pub use standby::Standby;

use hatch_vmm::{Machine, PortForward};
use tokio::sync::{OwnedMutexGuard, watch};

use crate::model::VmState;
use crate::network::GuestAddressing;

/// Another operation holds the VM (answered 409 by the API).
#[derive(Debug, Clone, thiserror::Error)]
#[error("vm '{vm}' is busy: {what} is in progress")]
pub struct Busy {
    pub vm: String,
    pub what: &'static str,
}

pub struct VmSupervisor {
    pub id: String,
    /// Proxied traffic to this VM.
    pub activity: Activity,
    /// The lifecycle state, for waiters (held requests of an auto-wake).
    state_tx: watch::Sender<VmState>,
    /// The wake in flight, if any (single-flight: requests share it).
    pub wake: Mutex<Option<wake::WakeWatch>>,
    /// Proxied requests held while the VM wakes (bounded).
    pub waiting: std::sync::atomic::AtomicUsize,
    /// When the last wake failed and why: requests fail fast for a while
    /// instead of starting one failing restore after another.
    pub wake_failure: Mutex<Option<(tokio::time::Instant, String)>>,
    /// Degradations of the operation under way (a wake), for its event.
    pub warnings: Mutex<Vec<String>>,
    /// Held for the whole of an operation (boot, stop, delete, ...). A
    /// user's operation on a VM busy with another is answered 409 at once,
    /// unless that one is housekeeping (see [`VmSupervisor::try_begin`]).
    op: Arc<tokio::sync::Mutex<()>>,
    /// Serializes state changes: held across the write to the state store
    /// so that the stored state and the published one change in one order.
    pub(crate) transitions: tokio::sync::Mutex<()>,
    /// Held while connecting to the guest agent: QEMU's socket serves one
    /// client, and a second connection would wait behind the first.
    pub agent_connect: tokio::sync::Mutex<()>,
    /// The QEMU started ahead of the next wake, if any. Held across that
    /// launch, and by every launch of the VM while it looks: only one QEMU
    /// at a time uses the VM's sockets and pid file.
    pub standby: tokio::sync::Mutex<Option<Standby>>,
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
    /// The outbound address the running guest holds, as Hatch set it (the
    /// kernel parameters of a cold boot, the agent after a restore); None
    /// while not known.
    pub guest_net: Option<GuestAddressing>,
    /// `guest_net` at the last capture, with that snapshot's id: a wake from
    /// it onto the same address needs no re-addressing (in memory only; a
    /// restarted daemon has the agent address the guest again).
    pub net_at_capture: Option<(String, GuestAddressing)>,
    /// What the running QEMU was launched as (the spec of its launch, or of
    /// the launch a standby it came from stood in for). A suspend that
    /// keeps the QEMU warm builds the standby's spec from it.
    pub launched: Option<hatch_vmm::MachineSpec>,
    /// The QEMU whose exit a watcher task awaits: a warm standby's QEMU
    /// comes back to the VM still watched.
    pub watched: Option<std::sync::Weak<Machine>>,
}

/// Proof that the holder runs the only operation on a VM.
pub struct OpGuard {
    _guard: OwnedMutexGuard<()>,
    rt: Arc<VmSupervisor>,
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        self.rt.lock().busy_with = None;
        // Requests waiting to start the VM (autostart) look again.
        self.rt.state_tx.send_modify(|_| {});
    }
}

impl VmSupervisor {
    pub fn new(id: String, state: VmState, forwards: Vec<PortForward>) -> Arc<VmSupervisor> {
        Arc::new(VmSupervisor {
            id,
            activity: Activity::default(),
            state_tx: watch::Sender::new(state),
            wake: Mutex::new(None),
            waiting: Default::default(),
            wake_failure: Mutex::new(None),
            warnings: Mutex::default(),
            op: Arc::default(),
            transitions: tokio::sync::Mutex::new(()),
            agent_connect: tokio::sync::Mutex::new(()),
            standby: tokio::sync::Mutex::new(None),
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
                guest_net: None,
                net_at_capture: None,
                launched: None,
                watched: None,
            }),
        })
    }

    /// Remember the guest's outbound address as captured in `snapshot_id`.
    pub fn note_net_at_capture(&self, snapshot_id: &str) {
        let mut inner = self.lock();
        inner.net_at_capture = inner.guest_net.map(|n| (snapshot_id.to_string(), n));
    }

    /// Whether a guest restored from `snapshot_id` already holds `wanted`.
    pub fn captured_with_net(&self, snapshot_id: &str, wanted: GuestAddressing) -> bool {
        self.lock()
            .net_at_capture
            .as_ref()
            .is_some_and(|(id, n)| id == snapshot_id && *n == wanted)
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> VmState {
        self.lock().state
    }

    /// Record a new state (the caller holds `inner`) and tell waiters.
    /// Lock order is `activity` before `inner` (see [`VmSupervisor::admit`]):
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
        // Lock order: `activity`, then `inner`.
        self.activity.admit(track, || {
            let inner = self.lock();
            if inner.state != VmState::Running || !(inner.ready || unready_ok) {
                return None;
            }
            Some(inner.forwards.iter().find(|f| f.guest == guest_port)?.host)
        })
    }

    /// Admit a session that needs the VM running but none of its ports
    /// (an exec): counted in flight like a tracked request, so that an idle
    /// suspend waits for it.
    pub fn admit_session(&self) -> bool {
        self.activity
            .admit(true, || {
                (self.lock().state == VmState::Running).then_some(())
            })
            .is_some()
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

    /// Start a user's operation `what`, or fail if another one runs. The
    /// daemon's own short housekeeping (retention after an upload or each
    /// minute, a route update) is waited for, up to
    /// [`HOUSEKEEPING_WAIT`]: a user should not have to retry because of
    /// work they did not ask for. The caller checks the VM's state after.
    pub async fn try_begin(self: &Arc<Self>, what: &'static str) -> Result<OpGuard, Busy> {
        let busy = match self.try_begin_now(what) {
            Ok(guard) => return Ok(guard),
            Err(busy) => busy,
        };
        if !HOUSEKEEPING.contains(&busy.what) {
            return Err(busy);
        }
        match tokio::time::timeout(HOUSEKEEPING_WAIT, self.op.clone().lock_owned()).await {
            Ok(guard) => Ok(self.hold(guard, what)),
            Err(_) => Err(busy),
        }
    }

    /// Start operation `what`, or fail at once if any other one runs (for
    /// the daemon's own operations that must not wait, e.g. an idle
    /// suspend, which holds the VM's requests from its claim on).
    pub fn try_begin_now(self: &Arc<Self>, what: &'static str) -> Result<OpGuard, Busy> {
        match self.op.clone().try_lock_owned() {
            Ok(guard) => Ok(self.hold(guard, what)),
            Err(_) => Err(Busy {
                vm: self.id.clone(),
                what: self.lock().busy_with.unwrap_or("another operation"),
            }),
        }
    }

    /// Wait for the running operation, if any, then start `what`.
    pub async fn begin(self: &Arc<Self>, what: &'static str) -> OpGuard {
        let guard = self.op.clone().lock_owned().await;
        self.hold(guard, what)
    }

    fn hold(self: &Arc<Self>, guard: OwnedMutexGuard<()>, what: &'static str) -> OpGuard {
        self.lock().busy_with = Some(what);
        OpGuard {
            _guard: guard,
            rt: self.clone(),
        }
    }
}

/// Operations the daemon runs on its own, that end in moments.
/// (Not a disk compaction: it may take minutes.)
const HOUSEKEEPING: [&str; 2] = ["retention", "route update"];
/// How long a user's operation waits for housekeeping before it is busy.
const HOUSEKEEPING_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_users_operation_waits_for_housekeeping_but_not_for_another_operation() {
        let rt = VmSupervisor::new("vm-a".into(), VmState::Running, Vec::new());

        // Housekeeping ends: the operation starts then.
        let retention = rt.begin("retention").await;
        let snapshot = tokio::spawn({
            let rt = rt.clone();
            async move { rt.try_begin("snapshot").await.map(|_| ()) }
        });
        tokio::time::sleep(HOUSEKEEPING_WAIT / 2).await;
        assert!(!snapshot.is_finished());
        drop(retention);
        snapshot.await.unwrap().unwrap();

        // Housekeeping that outlasts the wait: busy, naming it.
        let retention = rt.begin("retention").await;
        let busy = rt.try_begin("stop").await.err().unwrap();
        assert_eq!(busy.what, "retention");
        // The daemon's own operations that must not wait do not.
        let started = tokio::time::Instant::now();
        let busy = rt.try_begin_now("snapshot").err().unwrap();
        assert_eq!(
            (busy.what, started.elapsed()),
            ("retention", Duration::ZERO)
        );
        drop(retention);

        // Another user's operation: busy at once.
        let snapshot = rt.try_begin("snapshot").await.unwrap();
        let started = tokio::time::Instant::now();
        let busy = rt.try_begin("stop").await.err().unwrap();
        assert_eq!((busy.what, started.elapsed()), ("snapshot", Duration::ZERO));
        drop(snapshot);
        rt.try_begin("stop").await.unwrap();
    }
}
