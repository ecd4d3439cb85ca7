//! Node membership: each daemon upserts its row in `nodes` every
//! [`heartbeat_every`]; a node whose heartbeat is older than the down time
//! (by the database's clock, never a node's) is shown `down`.

use std::time::Duration;

use crate::config::Config;
use crate::manager::now_rfc3339;
use crate::model::Node;
use crate::state::{NodeBeat, NodeRecord, StateStore, StoreError};

/// How often a node renews its heartbeat: every 2 s, and at least six times
/// per down time, so that the lease (half the down time) spans three beats
/// and one slow write neither fences a node nor makes it look lost.
pub fn heartbeat_every(down_after: Duration) -> Duration {
    Duration::from_secs(2).min(down_after / 6)
}

/// Who this daemon is in the cluster.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub name: String,
    pub addr: Option<String>,
    pub started_at: String,
    pub down_after: Duration,
}

impl NodeIdentity {
    /// `cluster_addr`: where the node's cluster listener is bound.
    pub fn from_config(cfg: &Config, cluster_addr: Option<std::net::SocketAddr>) -> NodeIdentity {
        NodeIdentity {
            name: cfg.node_name.clone(),
            addr: cluster_addr.map(|a| a.to_string()),
            started_at: now_rfc3339(),
            down_after: cfg.node_down_after,
        }
    }

    fn beat(&self) -> NodeBeat {
        NodeBeat {
            name: self.name.clone(),
            addr: self.addr.clone(),
            free_memory_mib: available_memory_mib().unwrap_or(0),
            started_at: self.started_at.clone(),
        }
    }
}

/// Register this node (before it serves anything).
pub async fn register(store: &dyn StateStore, me: &NodeIdentity) -> Result<(), StoreError> {
    store.heartbeat(&me.beat()).await
}

/// Every node, as the API shows it.
pub async fn list(store: &dyn StateStore, down_after: Duration) -> Result<Vec<Node>, StoreError> {
    Ok(store
        .list_nodes()
        .await?
        .into_iter()
        .map(|n| present(n, down_after))
        .collect())
}

fn present(n: NodeRecord, down_after: Duration) -> Node {
    let state = if n.silent_for > down_after {
        "down".to_string()
    } else {
        n.state
    };
    Node {
        name: n.name,
        address: n.addr,
        state,
        vms: n.vms,
        free_memory_mib: n.free_memory_mib,
        last_heartbeat: n.heartbeat_at,
        seconds_since_heartbeat: (n.silent_for.as_secs_f64() * 10.0).round() / 10.0,
        started_at: n.started_at,
    }
}

/// `MemAvailable` of /proc/meminfo in MiB.
fn available_memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(silent: u64, state: &str) -> NodeRecord {
        NodeRecord {
            name: "n1".into(),
            addr: None,
            state: state.into(),
            started_at: "t".into(),
            free_memory_mib: 1,
            heartbeat_at: "t".into(),
            silent_for: Duration::from_secs(silent),
            vms: 0,
        }
    }

    #[test]
    fn a_node_is_down_only_after_the_down_time() {
        let down_after = Duration::from_secs(15);
        assert_eq!(present(record(15, "up"), down_after).state, "up");
        assert_eq!(present(record(16, "up"), down_after).state, "down");
        assert_eq!(present(record(1, "draining"), down_after).state, "draining");
        assert_eq!(present(record(99, "draining"), down_after).state, "down");
        assert!(available_memory_mib().is_some_and(|m| m > 0));
        // The lease (half the down time) always spans three heartbeats.
        for secs in [2, 3, 15, 60] {
            let down = Duration::from_secs(secs);
            assert!(heartbeat_every(down) * 3 <= down / 2, "{secs}");
        }
    }
}
