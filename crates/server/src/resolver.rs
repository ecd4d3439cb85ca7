//! How the proxy finds a VM: host name -> route (in memory) -> the VM's
//! forwarded port, waking the VM first when it is suspended and the route
//! auto-wakes. Also counts proxied requests per VM, which idle detection
//! builds on.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use hatch_proxy::{Resolution, Resolver};

use crate::manager::VmManager;
use crate::wake::{WAKE_RETRY_AFTER, WakeError};

pub struct VmResolver {
    pub vms: Arc<VmManager>,
}

impl Resolver for VmResolver {
    async fn resolve(&self, host: &str, path: &str) -> Resolution {
        let Some(route) = self.vms.routes.get(host) else {
            return Resolution::UnknownHost;
        };
        let Ok(rt) = self.vms.runtime(&route.vm_id) else {
            return Resolution::UnknownHost;
        };
        let track = route.tracks(path);
        let vm_id = route.vm_id;
        match self
            .vms
            .admit_or_wake(&rt, route.port, track, route.auto_wake)
            .await
        {
            Ok(port) => Resolution::Backend {
                addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                vm_id,
                track,
            },
            Err(WakeError::NotRunning(state)) => Resolution::NotRunning {
                vm_id,
                state: state.to_string(),
            },
            Err(WakeError::Failed(why)) => Resolution::Unavailable {
                vm_id,
                code: "wake_failed",
                message: format!("waking it failed: {why}"),
                retry_after_secs: WAKE_RETRY_AFTER.as_secs(),
            },
            Err(WakeError::Timeout(t)) => Resolution::Unavailable {
                vm_id,
                code: "wake_timeout",
                message: format!("it did not wake within {} s", t.as_secs()),
                retry_after_secs: WAKE_RETRY_AFTER.as_secs(),
            },
            Err(WakeError::QueueFull(n)) => Resolution::Unavailable {
                vm_id,
                code: "wake_queue_full",
                message: format!("{n} requests are already waiting for it to wake"),
                retry_after_secs: 1,
            },
        }
    }

    fn on_request_end(&self, vm_id: &str) {
        if let Ok(rt) = self.vms.runtime(vm_id) {
            rt.activity.end();
        }
    }
}
