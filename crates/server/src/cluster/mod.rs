//! Several daemons sharing one database and one bucket: nodes register and
//! heartbeat ([`nodes`]); which VMs a node may act on is recorded per VM
//! (`vms.node`). The design, and what is still to come (takeover of a lost
//! node's VMs, forwarding between nodes), is in `docs/CLUSTER.md`.

pub mod drain;
pub mod hop;
pub mod lease;
pub mod moves;
pub mod nodes;
pub mod peers;
pub mod routes;
pub mod takeover;
