//! Several daemons sharing one database and one bucket: nodes register and
//! heartbeat ([`nodes`]); which VMs a node may act on is recorded per VM
//! (`vms.node`); requests and API calls go to the VM's node ([`peers`],
//! [`hop`]); lost nodes' VMs are taken over ([`takeover`], [`lease`]) and
//! woken where [`placement`] says. The design is in `docs/CLUSTER.md`.

pub mod drain;
pub mod hop;
pub mod lease;
pub mod moves;
pub mod nodes;
pub mod peers;
pub mod placement;
pub mod routes;
pub mod takeover;
