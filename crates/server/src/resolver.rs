//! How the proxy finds a VM: host name -> route (in memory) -> the VM's state
//! and forwarded port. Also counts in-flight proxied requests per VM, which
//! idle detection builds on.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use hatch_proxy::{Resolution, Resolver};

use crate::manager::VmManager;
use crate::model::VmState;

pub struct VmResolver {
    pub vms: Arc<VmManager>,
}

impl Resolver for VmResolver {
    async fn resolve(&self, host: &str) -> Resolution {
        let Some(route) = self.vms.routes.get(host) else {
            return Resolution::UnknownHost;
        };
        match self.vms.forward_for(&route.vm_id, route.port) {
            Some((VmState::Running, Some(fwd))) => {
                // Count the request as activity already here: idle detection
                // must not act between resolving and forwarding.
                if let Ok(rt) = self.vms.runtime(&route.vm_id) {
                    rt.activity.touch();
                }
                Resolution::Backend {
                    addr: SocketAddr::from((Ipv4Addr::LOCALHOST, fwd.host)),
                    vm_id: route.vm_id,
                }
            }
            Some((state, _)) => Resolution::NotRunning {
                vm_id: route.vm_id,
                state: state.to_string(),
            },
            None => Resolution::UnknownHost,
        }
    }

    fn on_request_start(&self, vm_id: &str) {
        if let Ok(rt) = self.vms.runtime(vm_id) {
            rt.activity.inflight.fetch_add(1, Ordering::Relaxed);
            rt.activity.touch();
        }
    }

    fn on_request_end(&self, vm_id: &str) {
        if let Ok(rt) = self.vms.runtime(vm_id) {
            // Saturating: never wrap below zero, whatever happened in between.
            let _ = rt
                .activity
                .inflight
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(1))
                });
            rt.activity.touch();
        }
    }
}
