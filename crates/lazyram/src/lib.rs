//! Lazy guest RAM: a snapshot's memory image served as a file before it
//! is all here.
//!
//! A wake from S3 used to download the whole RAM image before the guest
//! ran. Here the image is a FUSE file (one file, `ram`, in a mount of its
//! own) that QEMU maps as the guest's RAM (`memory-backend-file`,
//! `share=on`). A read of a chunk that is not local yet fetches it (from S3
//! through a [`ChunkSource`]) into a local cache file and then answers; a
//! background fill fetches the rest, the chunks the guest touched first
//! after its previous wake first of all. Pages the guest writes come back
//! through the kernel's writeback as FUSE writes into the cache file; the
//! chunks they touch are recorded as dirty, so the next suspend uploads only
//! those and refers to the rest by the ids they already have.
//!
//! A chunk that cannot be fetched never fails a read (QEMU would get
//! SIGBUS and the guest would die): the fetch is retried with back-off and
//! the failure is reported in [`Status`], for the daemon to decide.
//!
//! The server runs as a process of its own (`hatch lazyram`), so that a
//! restart of the daemon does not take the memory away from a running
//! guest; the daemon talks to it over a Unix socket ([`control`]).

mod cache;
pub mod control;
mod fs;
mod server;
mod source;

pub use cache::{RamCache, Status};
pub use server::{EndStatus, RAM_FILE, Server, ServerSpec, SpecChunk};
pub use source::{ChunkSource, FetchError, Layout};

/// Errors of the lazy RAM server.
#[derive(Debug, thiserror::Error)]
pub enum LazyRamError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid lazy RAM spec: {0}")]
    Spec(String),
    #[error("lazy RAM control: {0}")]
    Control(String),
}

impl LazyRamError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        LazyRamError::Io {
            what: what.into(),
            source,
        }
    }
}
