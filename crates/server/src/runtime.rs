//! The in-memory side of one VM: its lifecycle state (mirrored in SQLite), its
//! port forwards, its QEMU machine, and the lock that serializes operations.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use hatch_vmm::{Machine, PortForward};
use tokio::sync::OwnedMutexGuard;

use crate::error::ApiError;
use crate::model::VmState;

pub struct VmRuntime {
    pub id: String,
    /// Proxied traffic to this VM.
    pub activity: Activity,
    /// Held for the whole of an operation (boot, stop, delete, ...). Taken with
    /// `try_lock`: a second operation on a busy VM is answered 409 at once.
    op: Arc<tokio::sync::Mutex<()>>,
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
}

/// Proxied requests in flight and the time of the last request event.
#[derive(Default)]
pub struct Activity {
    pub inflight: AtomicU64,
    last: Mutex<Option<Instant>>,
}

impl Activity {
    pub fn touch(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    pub fn last(&self) -> Option<Instant> {
        *self.last.lock().unwrap_or_else(|p| p.into_inner())
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
    }
}

impl VmRuntime {
    pub fn new(id: String, state: VmState, forwards: Vec<PortForward>) -> Arc<VmRuntime> {
        Arc::new(VmRuntime {
            id,
            activity: Activity::default(),
            op: Arc::default(),
            inner: Mutex::new(Inner {
                state,
                forwards,
                machine: None,
                agent: None,
                busy_with: None,
            }),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> VmState {
        self.lock().state
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
