//! Content-addressed chunk store for snapshot data.
//!
//! A file (guest RAM, a disk layer, device state) is split into fixed-size
//! chunks. All-zero chunks are not stored at all; every other chunk is named by
//! the BLAKE3 hash of its content, compressed with zstd and uploaded only if the
//! store does not have it yet, so a second snapshot of an idle VM uploads
//! almost nothing. Chunks are immutable and their names are their hashes, so
//! writes are idempotent (no conditional writes needed; Garage ignores them)
//! and every read is verified.

mod error;
mod file;
mod gc;
mod lock;
pub mod s3;
mod store;

pub use error::ChunkError;
pub use file::{CHUNK_SIZE, FileChunks, is_chunk_id};
pub use gc::GcReport;
pub use lock::{BucketLock, LockKind};
pub use store::{ChunkStore, DownloadReport, UploadReport};
