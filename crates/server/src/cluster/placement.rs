//! Where a VM goes when no up node holds it: a lost node's suspended VM
//! being woken, or a VM moved off a draining node. The node that ran a VM
//! last keeps it while it is up (it has the local copy); otherwise nothing
//! local is left anywhere (local copies were the lost node's) and the VM
//! goes to the least loaded node that has room for it.

use crate::model::Node;

/// The node for a VM of `memory_mib`: among the up nodes (not down, not
/// draining) other nodes can reach (an address; `prefer` needs none, it is
/// the caller) and with that much memory free, the one running the fewest
/// VMs; on a tie `prefer` (no hop), then the most free memory. `except` is
/// never chosen. None: no node qualifies.
pub fn least_loaded<'a>(
    nodes: &'a [Node],
    memory_mib: u64,
    prefer: Option<&str>,
    except: Option<&str>,
) -> Option<&'a str> {
    nodes
        .iter()
        .filter(|n| n.state == "up" && Some(n.name.as_str()) != except)
        .filter(|n| n.address.is_some() || Some(n.name.as_str()) == prefer)
        .filter(|n| n.free_memory_mib >= memory_mib)
        .min_by_key(|n| {
            (
                n.vms,
                Some(n.name.as_str()) != prefer,
                std::cmp::Reverse(n.free_memory_mib),
            )
        })
        .map(|n| n.name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, state: &str, vms: u64, free: u64) -> Node {
        Node {
            name: name.into(),
            address: Some(format!("{name}:7171")),
            state: state.into(),
            vms,
            free_memory_mib: free,
            last_heartbeat: String::new(),
            seconds_since_heartbeat: 0.0,
            started_at: String::new(),
        }
    }

    #[test]
    fn the_node_running_fewest_vms_wins() {
        let nodes = [
            node("n1", "up", 3, 9000),
            node("n2", "up", 1, 2000),
            node("n3", "up", 2, 8000),
        ];
        assert_eq!(least_loaded(&nodes, 512, Some("n1"), None), Some("n2"));
    }

    #[test]
    fn a_tie_stays_on_the_caller_then_goes_to_the_most_free_memory() {
        let nodes = [
            node("n1", "up", 1, 1000),
            node("n2", "up", 1, 9000),
            node("n3", "up", 1, 5000),
        ];
        assert_eq!(least_loaded(&nodes, 512, Some("n1"), None), Some("n1"));
        assert_eq!(least_loaded(&nodes, 512, None, None), Some("n2"));
    }

    #[test]
    fn down_draining_full_unreachable_and_excepted_nodes_are_skipped() {
        let mut unreachable = node("n5", "up", 0, 9000);
        unreachable.address = None;
        let nodes = [
            node("n1", "down", 0, 9000),
            node("n2", "draining", 0, 9000),
            node("n3", "up", 0, 100),
            node("n4", "up", 0, 9000),
            unreachable,
            node("n6", "up", 5, 9000),
        ];
        assert_eq!(least_loaded(&nodes, 512, None, Some("n4")), Some("n6"));
        assert_eq!(least_loaded(&nodes, 512, None, None), Some("n4"));
        // The caller needs no address (it is the one asking).
        assert_eq!(least_loaded(&nodes, 512, Some("n5"), None), Some("n5"));
        assert_eq!(least_loaded(&nodes, 100_000, None, None), None);
    }
}
