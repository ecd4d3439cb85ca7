//! Self-fencing: no VM may run on two nodes at once. Other nodes take a
//! node's VMs over only after its heartbeat is older than the down time
//! (by the database's clock). A node therefore holds a lease of half the
//! down time, measured on its own monotonic clock from the *start* of its
//! last successful heartbeat write: when the lease runs out it pauses
//! (QMP `stop`) every VM it runs and admits no request, well before anyone
//! may take them over. When a heartbeat gets through again it resumes the
//! VMs that are still its own and kills the ones that were taken over
//! meanwhile (without writing anything about them: they are another
//! node's now). The timing argument is in docs/CLUSTER.md.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::cluster::nodes::{NodeIdentity, heartbeat_every};
use crate::manager::VmManager;
use crate::model::VmState;

/// How often the lease is checked (bounds how long a guest runs on after
/// the lease ran out while the daemon was scheduled).
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// Longest a fence waits for a QEMU to pause before killing it.
const PAUSE_LIMIT: Duration = Duration::from_secs(2);

pub struct Lease {
    /// Held by a fence and by a renewal: a renewal never runs while a fence
    /// is still pausing VMs (it would miss them).
    gate: tokio::sync::Mutex<()>,
    /// Start of the last heartbeat write that succeeded.
    renewed: std::sync::Mutex<Instant>,
    fenced: AtomicBool,
    /// VMs paused by the fence (resumed if still ours).
    paused: std::sync::Mutex<HashSet<String>>,
}

impl Default for Lease {
    fn default() -> Self {
        Lease {
            gate: tokio::sync::Mutex::new(()),
            renewed: std::sync::Mutex::new(Instant::now()),
            fenced: AtomicBool::new(false),
            paused: std::sync::Mutex::default(),
        }
    }
}

impl Lease {
    fn renewed_at(&self) -> Instant {
        *self.renewed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl VmManager {
    /// How long a heartbeat keeps this node's right to run its VMs.
    fn lease_time(&self) -> Duration {
        self.cfg.node_down_after / 2
    }

    /// This node may not serve its VMs now: its lease ran out (it could
    /// not reach the database) and it has not reconciled since.
    pub(crate) fn fenced(&self) -> bool {
        self.shares_state()
            && (self.lease.fenced.load(Ordering::SeqCst)
                || self.lease.renewed_at().elapsed() > self.lease_time())
    }

    /// Heartbeat (see [`heartbeat_every`]) and keep the lease until
    /// `shutdown`; with a shared database, also fence when it runs out.
    pub async fn membership_worker(self: Arc<Self>, me: NodeIdentity, shutdown: CancellationToken) {
        let watchdog = {
            let this = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move { this.lease_watchdog(shutdown).await })
        };
        let mut tick = tokio::time::interval(heartbeat_every(self.cfg.node_down_after));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let started = Instant::now();
            match crate::cluster::nodes::register(self.store.as_ref(), &me).await {
                Ok(()) => {
                    if failing {
                        tracing::info!(node = %me.name, "heartbeat renewed");
                    }
                    failing = false;
                    self.lease_renewed(started).await;
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(node = %me.name, error = %anyhow::Error::from(e), "heartbeat failed");
                    }
                    failing = true;
                }
            }
        }
        watchdog.abort();
    }

    async fn lease_watchdog(&self, shutdown: CancellationToken) {
        if !self.shares_state() {
            return;
        }
        let mut tick = tokio::time::interval(CHECK_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let silent = self.lease.renewed_at().elapsed();
            if silent > self.lease_time() && !self.lease.fenced.load(Ordering::SeqCst) {
                let _gate = self.lease.gate.lock().await;
                // Renewed while we waited for the gate?
                if self.lease.renewed_at().elapsed() > self.lease_time()
                    && !self.lease.fenced.swap(true, Ordering::SeqCst)
                {
                    self.fence(silent).await;
                }
            }
        }
    }

    /// Pause every VM this node has a QEMU for, all at once; one that does
    /// not pause within [`PAUSE_LIMIT`] is killed (a takeover resumes it
    /// elsewhere from its last snapshot). Call with the gate held.
    async fn fence(&self, silent: Duration) {
        let pauses = self.all_supervisors().into_iter().filter_map(|rt| {
            let machine = rt.machine()?;
            // Resumed after the fence if still ours: a running or booting
            // guest. An operation under way (a capture, a restore, a stop)
            // pauses and resumes the guest itself and must not be resumed
            // from here in its middle.
            let was_running = matches!(rt.state(), VmState::Running | VmState::Starting);
            Some(async move {
                let stop = machine.command(&hatch_qmp::commands::Stop);
                match tokio::time::timeout(PAUSE_LIMIT, stop).await {
                    Ok(Ok(_)) => was_running.then(|| rt.id.clone()),
                    outcome => {
                        tracing::error!(vm = %rt.id, ?outcome, "could not pause a vm while fenced: killing it");
                        machine.kill();
                        None
                    }
                }
            })
        });
        let paused: Vec<String> = futures_util::future::join_all(pauses)
            .await
            .into_iter()
            .flatten()
            .collect();
        tracing::error!(
            silent_ms = silent.as_millis() as u64,
            paused = paused.len(),
            "lost the state database for longer than the lease: paused every vm until it is back"
        );
        self.lease
            .paused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(paused);
    }

    /// A heartbeat that started at `started` got through.
    async fn lease_renewed(&self, started: Instant) {
        let _gate = self.lease.gate.lock().await;
        let silent = self.lease.renewed_at().elapsed();
        // The lease ran out even if the watchdog has not run yet (the whole
        // process was frozen): fence first, then reconcile.
        if self.shares_state()
            && silent > self.lease_time()
            && !self.lease.fenced.swap(true, Ordering::SeqCst)
        {
            self.fence(silent).await;
        }
        *self.lease.renewed.lock().unwrap_or_else(|p| p.into_inner()) = started;
        if !self.lease.fenced.load(Ordering::SeqCst) {
            return;
        }
        // Back after a fence: keep what is still ours, let go of the rest.
        let paused: HashSet<String> =
            std::mem::take(&mut *self.lease.paused.lock().unwrap_or_else(|p| p.into_inner()));
        let me = self.cfg.node_name.as_str();
        for rt in self.all_supervisors() {
            let owner = match self.store.get_vm(&rt.id).await {
                Ok(rec) => rec.and_then(|r| r.vm.node),
                Err(e) => {
                    // Unknown yet: stay fenced and try again with the next beat.
                    tracing::warn!(error = %anyhow::Error::from(e), "reconciling after a fence failed");
                    self.lease
                        .paused
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend(paused);
                    return;
                }
            };
            if owner.as_deref() == Some(me) {
                if paused.contains(&rt.id)
                    && let Some(machine) = rt.machine()
                    && let Err(e) = machine.command(&hatch_qmp::commands::Cont).await
                {
                    tracing::error!(vm = %rt.id, error = %e, "could not resume a vm after a fence");
                }
                continue;
            }
            // Taken over while this node was away: its QEMU goes, and
            // nothing is written about it (the record is the new owner's).
            let machine = rt.lock().machine.take();
            if let Some(machine) = machine {
                machine.kill();
            }
            self.forget_supervisor(&rt.id);
            tracing::warn!(vm = %rt.id, owner = ?owner, "a vm of this node was taken over while it was fenced: its process was ended");
        }
        self.lease.fenced.store(false, Ordering::SeqCst);
        tracing::info!("the state database is back: the lease is renewed");
    }
}
