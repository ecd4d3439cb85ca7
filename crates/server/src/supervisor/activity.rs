//! A VM's proxied traffic: requests in flight, when the last one ended, and
//! the idle suspend's claim. Uses tokio's clock so that idle logic is tested
//! with paused time.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

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

    /// Admit a request if `serves` (run under this lock, so that an idle
    /// claim cannot come in between) says the VM takes it; a tracked request
    /// counts as in flight from here on.
    pub(super) fn admit<T>(&self, track: bool, serves: impl FnOnce() -> Option<T>) -> Option<T> {
        let mut a = self.lock();
        if a.suspending {
            return None;
        }
        let admitted = serves()?;
        if track {
            a.inflight += 1;
            a.last = Instant::now();
        }
        Some(admitted)
    }

    /// The idle suspend is over (done or given up).
    pub(super) fn release_idle(&self) {
        self.lock().suspending = false;
    }
}
