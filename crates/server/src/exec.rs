//! Exec: commands run, and files copied, in a VM through its guest agent
//! (`POST /vms/{id}/exec`, its WebSocket variant, `/vms/{id}/files`). A
//! suspended VM is woken first, as a proxied request would wake it, and an
//! open session counts as a request in flight: the idle suspend waits for
//! it.

use std::sync::Arc;

use hatch_vmm::agent::{Agent, ExecSession, ExecStart};

use crate::error::ApiError;
use crate::manager::VmManager;
use crate::model::VmState;
use crate::supervisor::VmSupervisor;
use crate::supervisor::wake::WakeError;

/// A session and the VM activity it holds.
pub struct Exec {
    pub session: ExecSession,
    _in_flight: InFlight,
}

/// Ends the session's "request in flight" when dropped.
struct InFlight(Arc<VmSupervisor>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.activity.end();
    }
}

/// Start `start` in VM `id` (an id or a name), waking it if it is
/// suspended.
pub async fn open(vms: &Arc<VmManager>, id: &str, start: ExecStart) -> Result<Exec, ApiError> {
    let id = vms.resolve_local(id).await?;
    let vm = vms.get(&id).await?;
    if !vms.image(&vm.image).await?.agent {
        return Err(ApiError::conflict(format!(
            "vm '{id}' runs image '{}', which has no Hatch guest agent to run commands",
            vm.image
        )));
    }
    let rt = vms.supervisor(&id)?;
    let in_flight = admit(vms, &rt).await?;
    let agent = agent(vms, &rt).await?;
    let session = agent
        .exec(&start)
        .await
        .map_err(|e| ApiError::Unavailable("agent_unavailable", format!("the guest agent: {e}")))?;
    Ok(Exec {
        session,
        _in_flight: in_flight,
    })
}

/// The VM running, counted busy: at once if it runs, after a wake if it is
/// suspended (or being suspended, checkpointed, restored).
async fn admit(vms: &Arc<VmManager>, rt: &Arc<VmSupervisor>) -> Result<InFlight, ApiError> {
    for _ in 0..3 {
        if rt.admit_session() {
            return Ok(InFlight(rt.clone()));
        }
        let state = rt.state();
        if state == VmState::Starting {
            // Booting: commands can run once QEMU runs (the agent answers
            // when the guest is up), whether or not its app serves HTTP.
            let mut states = rt.watch_state();
            let wait = states.wait_for(|s| *s != VmState::Starting);
            if tokio::time::timeout(vms.cfg.wake_timeout, wait)
                .await
                .is_err()
            {
                return Err(ApiError::Unavailable(
                    "boot_timeout",
                    format!("vm '{}' is still starting", rt.id),
                ));
            }
            continue;
        }
        if matches!(
            state,
            VmState::Stopped | VmState::Stopping | VmState::Failed
        ) {
            return Err(not_running(&rt.id, state));
        }
        let port = rt.lock().forwards.first().map(|f| f.guest).unwrap_or(0);
        match rt.admit_or_wake(vms, port, true, true).await {
            Ok(_) => return Ok(InFlight(rt.clone())),
            // Running, but the port is not forwarded: admitted above next.
            Err(WakeError::NotRunning(VmState::Running)) => {}
            Err(WakeError::NotRunning(state)) => return Err(not_running(&rt.id, state)),
            Err(WakeError::Failed(why)) => {
                return Err(ApiError::Unavailable(
                    "wake_failed",
                    format!("waking vm '{}' failed: {why}", rt.id),
                ));
            }
            Err(WakeError::Timeout(t)) => {
                return Err(ApiError::Unavailable(
                    "wake_timeout",
                    format!("vm '{}' did not wake within {} s", rt.id, t.as_secs()),
                ));
            }
            Err(WakeError::QueueFull(n)) => {
                return Err(ApiError::Unavailable(
                    "wake_queue_full",
                    format!("{n} requests are already waiting for vm '{}'", rt.id),
                ));
            }
        }
    }
    Err(ApiError::conflict(format!(
        "vm '{}' keeps changing state; try again",
        rt.id
    )))
}

fn not_running(id: &str, state: VmState) -> ApiError {
    ApiError::conflict(format!(
        "vm '{id}' is {state}; start it to run commands in it"
    ))
}

/// The VM's agent connection (held open while it runs), connected now if
/// there is none.
async fn agent(vms: &VmManager, rt: &VmSupervisor) -> Result<Agent, ApiError> {
    if let Some(agent) = rt.lock().agent.clone().filter(|a| !a.is_closed()) {
        return Ok(agent);
    }
    let _connecting = rt.agent_connect.lock().await;
    if let Some(agent) = rt.lock().agent.clone().filter(|a| !a.is_closed()) {
        return Ok(agent);
    }
    // Only to a running guest: a suspend that keeps its QEMU closes the
    // channel (under this lock) so that nothing reaches its devices again.
    let state = rt.state();
    if state != VmState::Running {
        return Err(not_running(&rt.id, state));
    }
    // The closed connection goes first, or the new one would wait behind it.
    rt.lock().agent = None;
    let agent = Agent::connect(&vms.paths(&rt.id).agent_socket)
        .await
        .map_err(|e| ApiError::Unavailable("agent_unavailable", e.to_string()))?;
    rt.lock().agent = Some(agent.clone());
    Ok(agent)
}
