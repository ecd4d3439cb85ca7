//! The QEMU driver: the command line of a Hatch microVM, spawning QEMU as a
//! daemon that outlives `hatch serve`, re-adopting it after a restart, and the
//! host facts (accelerator, TSC frequency, free ports) a launch depends on.

pub mod accel;
pub mod agent;
pub mod disk;
mod error;
pub mod host;
pub mod machine;
mod snapshot;
pub mod spec;

pub use accel::{Accel, AccelChoice};
pub use error::VmmError;
pub use machine::{Exit, Machine};
pub use spec::{MachineSpec, PortForward};
