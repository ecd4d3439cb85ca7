//! How the core carries out what a VM's supervisor asks for (see
//! [`crate::supervisor::wake::Lifecycle`]): starts and restores with QEMU,
//! S3 and the state store.

use std::sync::Arc;

use tokio_util::task::TaskTracker;

use crate::manager::VmManager;
use crate::model::VmState;
use crate::snapshot::WakeCause;
use crate::supervisor::wake::{Lifecycle, WakeLimits};
use crate::supervisor::{OpGuard, VmSupervisor};

#[async_trait::async_trait]
impl Lifecycle for Arc<VmManager> {
    fn fenced(&self) -> bool {
        VmManager::fenced(self)
    }

    fn wake_limits(&self) -> WakeLimits {
        WakeLimits {
            queue: self.cfg.wake_queue,
            timeout: self.cfg.wake_timeout,
        }
    }

    fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    async fn start(&self, vm: &Arc<VmSupervisor>) -> Result<(), String> {
        VmManager::start(self, &vm.id)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn restore(
        &self,
        vm: &Arc<VmSupervisor>,
        guard: OpGuard,
        since: std::time::Instant,
    ) -> Result<(), String> {
        let (rec, prior) = self
            .begin_restore(vm, None)
            .await
            .map_err(|e| e.to_string())?;
        let cause = WakeCause {
            trigger: "request",
            since,
        };
        let storage = self.storage.clone();
        self.clone()
            .run_restore(vm.clone(), guard, rec, prior, storage, cause)
            .await;
        match vm.state() {
            VmState::Running => Ok(()),
            state => Err(self
                .get(&vm.id)
                .await
                .ok()
                .and_then(|v| v.state_reason)
                .unwrap_or_else(|| format!("vm is {state}"))),
        }
    }
}
