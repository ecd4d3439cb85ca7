//! Where missing chunks come from, and the image's shape.

use async_trait::async_trait;

/// The shape of a RAM image: its length, its chunk size, and which chunks
/// are all zeros (those are never fetched; the cache file's holes read as
/// zeros).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub len: u64,
    pub chunk_size: u64,
    pub zero: Vec<bool>,
}

impl Layout {
    pub fn chunks(&self) -> usize {
        self.zero.len()
    }

    /// Byte range of chunk `i`.
    pub fn range(&self, i: usize) -> (u64, u64) {
        let start = i as u64 * self.chunk_size;
        (start, (start + self.chunk_size).min(self.len))
    }

    /// The chunks `[offset, offset + len)` overlaps.
    pub fn chunks_of(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        if len == 0 || offset >= self.len {
            return 0..0;
        }
        let end = (offset + len).min(self.len);
        (offset / self.chunk_size) as usize..end.div_ceil(self.chunk_size) as usize
    }
}

/// Why a chunk could not be had (this time).
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The store did not answer, or answered with an error: worth retrying.
    #[error("{0}")]
    Unavailable(String),
    /// The store answered with bytes that are not the chunk (hash or size
    /// wrong). Retried too (another read may get a good copy), but reported
    /// as corruption.
    #[error("corrupt: {0}")]
    Corrupt(String),
}

/// Fetches the plain (decompressed, verified) bytes of chunk `index`.
#[async_trait]
pub trait ChunkSource: Send + Sync + 'static {
    async fn fetch(&self, index: usize) -> Result<Vec<u8>, FetchError>;
}
