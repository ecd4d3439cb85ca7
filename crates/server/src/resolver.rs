//! How the proxy finds a VM: host name -> route (in memory) -> the VM's
//! forwarded port, waking the VM first when it is suspended and the route
//! auto-wakes. Also counts proxied requests per VM, which idle detection
//! builds on.
//!
//! In a cluster a route may lead to a VM another node runs: the request is
//! forwarded to that node's cluster address with a signed hop
//! ([`crate::cluster::hop`]), where a [`VmResolver`] in hop mode checks the
//! signature and serves it as a local request (never forwarding it again).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use hatch_proxy::{Resolution, Resolver};

use crate::cluster::hop;
use crate::cluster::takeover::Claimed;
use crate::manager::VmManager;
use crate::supervisor::wake::{WAKE_RETRY_AFTER, WakeError};

/// The host name under which a node's cluster address serves its API to
/// other nodes (API calls forwarded to the node that runs the VM).
pub const API_HOST: &str = "api.hatch.internal";

pub struct VmResolver {
    pub vms: Arc<VmManager>,
    /// The cluster address: only signed hops from other nodes, served here.
    pub hop_only: bool,
    /// This node's API, for API calls forwarded by other nodes.
    pub api_addr: SocketAddr,
}

impl Resolver for VmResolver {
    async fn resolve(&self, host: &str, path: &str, headers: &http::HeaderMap) -> Resolution {
        if self.hop_only {
            let Some(key) = &self.vms.hop else {
                return Resolution::Forbidden {
                    message: "this node has no HATCH_CLUSTER_SECRET".into(),
                };
            };
            if let Err(e) = key.verify(headers.get(hop::HEADER), host) {
                return Resolution::Forbidden {
                    message: e.to_string(),
                };
            }
            if host == API_HOST {
                return Resolution::Backend {
                    addr: self.api_addr,
                    vm_id: String::new(),
                    track: false,
                    run: 0,
                };
            }
        }
        let route = match self.vms.routes.get(host) {
            Some(route) => route,
            None if self.vms.refresh_routes_on_miss().await => match self.vms.routes.get(host) {
                Some(route) => route,
                None => return Resolution::UnknownHost,
            },
            None => return Resolution::UnknownHost,
        };
        let rt = match self.vms.supervisor(&route.vm_id) {
            Ok(rt) => rt,
            Err(_) => match self.elsewhere(host, &route.vm_id).await {
                Elsewhere::Adopted(rt) => rt,
                Elsewhere::Answer(resolution) => return resolution,
            },
        };
        let track = route.tracks(path);
        let vm_id = route.vm_id;
        match rt
            .admit_or_wake(&self.vms, route.port, track, route.auto_wake)
            .await
        {
            Ok(port) => Resolution::Backend {
                addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                vm_id,
                track,
                // Its QEMU's pid: a wake keeps the port but not the
                // connections.
                run: rt
                    .machine()
                    .map_or(0, |m| u64::from(m.pid().unsigned_abs())),
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
        if let Ok(rt) = self.vms.supervisor(vm_id) {
            rt.activity.end();
        }
    }
}

impl VmResolver {
    /// A route to a VM this node does not run: forward it to the node that
    /// does, once (a hop is never forwarded again).
    /// A suspended VM whose node is down is placed on the least loaded node
    /// (this one on a tie) and woken there from S3.
    async fn elsewhere(&self, host: &str, vm_id: &str) -> Elsewhere {
        let vm_id = vm_id.to_string();
        if self.hop_only {
            if let Ok(Some(rt)) = self.vms.attach_handed_over(&vm_id).await {
                return Elsewhere::Adopted(rt);
            }
            return Elsewhere::Answer(Resolution::Unavailable {
                vm_id,
                code: "vm_moved",
                message: "it no longer runs on this node".into(),
                retry_after_secs: 1,
            });
        }
        let unreachable_store = |vm_id: String, e: crate::state::StoreError| {
            tracing::warn!(vm = %vm_id, error = %anyhow::Error::from(e), "owner lookup failed");
            Elsewhere::Answer(Resolution::Unavailable {
                vm_id,
                code: "state_store_unavailable",
                message: "the state database is unreachable".into(),
                retry_after_secs: 1,
            })
        };
        let mut remote = match self.vms.peers.remote(&vm_id).await {
            Ok(Some(remote)) => remote,
            // Handed to this node by another (a move)?
            Ok(None) => {
                return match self.vms.attach_handed_over(&vm_id).await {
                    Ok(Some(rt)) => Elsewhere::Adopted(rt),
                    Ok(None) => Elsewhere::Answer(Resolution::UnknownHost),
                    Err(e) => unreachable_store(vm_id, e),
                };
            }
            Err(e) => return unreachable_store(vm_id, e),
        };
        if !remote.up {
            match self.vms.adopt(&vm_id).await {
                Ok(Some(Claimed::Here(rt))) => return Elsewhere::Adopted(rt),
                Ok(Some(Claimed::Elsewhere) | None) => {}
                Err(e) => return unreachable_store(vm_id, e),
            }
            // Placed on another node, or another node claimed it first (it
            // wakes there: forward to it, so every request is served by the
            // one restore), or it is not suspended yet (the takeover comes
            // with the next heartbeat).
            self.vms.peers.forget(&vm_id);
            remote = match self.vms.peers.remote(&vm_id).await {
                Ok(Some(remote)) if remote.up => remote,
                Ok(Some(remote)) => {
                    return Elsewhere::Answer(Resolution::Unavailable {
                        vm_id,
                        code: "node_down",
                        message: format!("its node '{}' is down; retry shortly", remote.node),
                        retry_after_secs: 1,
                    });
                }
                // This node's now (claimed or taken over here meanwhile).
                Ok(None) => {
                    return match self.vms.attach_handed_over(&vm_id).await {
                        Ok(Some(rt)) => Elsewhere::Adopted(rt),
                        Ok(None) => Elsewhere::Answer(Resolution::UnknownHost),
                        Err(e) => unreachable_store(vm_id, e),
                    };
                }
                Err(e) => return unreachable_store(vm_id, e),
            };
        }
        Elsewhere::Answer(match (remote.addr, &self.vms.hop) {
            (Some(addr), Some(key)) => Resolution::Peer {
                addr,
                vm_id,
                header: key.sign(host),
            },
            _ => Resolution::Unavailable {
                vm_id,
                code: "node_unreachable",
                message: format!(
                    "it runs on node '{}', which this node cannot forward to (both need \
                     --cluster-addr and the same HATCH_CLUSTER_SECRET)",
                    remote.node
                ),
                retry_after_secs: 5,
            },
        })
    }
}

enum Elsewhere {
    /// This node claimed the VM: serve it here.
    Adopted(Arc<crate::supervisor::VmSupervisor>),
    Answer(Resolution),
}
