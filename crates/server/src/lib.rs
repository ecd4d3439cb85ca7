//! The Hatch daemon.
//!
//! - [`daemon`]: the composition root (`hatch serve`).
//! - [`api`]: HTTP handlers, a thin layer over the core.
//! - [`manager`] with [`boot`] and [`routes`]: the core that owns VMs, their
//!   lifecycle and proxy routes; [`supervisor`] is one VM's state machine,
//!   operation lock, idle claim and single-flight wake.
//! - [`state`]: the state store (SQLite or PostgreSQL); [`auth`]: API keys; [`metrics`]: Prometheus.
//! - [`cluster`]: nodes sharing one database (heartbeats, `GET /nodes`).
//! - [`resolver`]: how the proxy finds a VM for a host name; [`idle`]: suspending idle VMs;
//!   [`events`]: wakes and idle suspends as events, metrics and logs.

pub mod api;
pub mod auth;
pub mod boot;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod error;
pub mod events;
pub mod exec;
pub mod fault;
pub mod guest_sync;
pub mod idle;
pub mod images;
pub mod lifecycle;
pub mod manager;
pub mod metrics;
pub mod model;
pub mod network;
pub mod resolver;
pub mod routes;
pub mod snapshot;
pub mod state;
pub mod supervisor;

pub use config::{Config, S3Config, Secret};
pub use daemon::run;
pub use hatch_snapshot::durable;
