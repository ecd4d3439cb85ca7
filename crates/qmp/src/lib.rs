//! Async client for the QEMU Machine Protocol (QMP).
//!
//! One [`Qmp`] is one connection to one QEMU process. Commands are typed
//! ([`Command`]): each names its QMP command and its answer type. A reader task
//! demultiplexes the socket: answers go to the caller that waits for that `id`,
//! asynchronous events go to a broadcast channel, and end of stream (QEMU exited
//! or closed the socket) fails every waiting call and resolves [`Qmp::closed`].

mod client;
pub mod commands;
mod error;

pub use client::{Event, Qmp};
pub use commands::Command;
pub use error::QmpError;
