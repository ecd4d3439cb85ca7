//! How a file maps to chunks.

use serde::{Deserialize, Serialize};

/// Chunk size: 1 MiB balances dedup granularity (a dirty page dirties one
/// chunk) against the number of S3 requests per GiB (1024).
pub const CHUNK_SIZE: u64 = 1 << 20;

/// A file as a list of chunks; `None` is an all-zero chunk (not stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChunks {
    pub len: u64,
    pub chunk_size: u64,
    pub chunks: Vec<Option<String>>,
}

impl FileChunks {
    /// Number of chunks a file of `len` bytes has.
    pub fn count(len: u64, chunk_size: u64) -> u64 {
        len.div_ceil(chunk_size)
    }

    /// Byte range of chunk `i`.
    pub fn range(&self, i: usize) -> (u64, u64) {
        let start = i as u64 * self.chunk_size;
        (start, (start + self.chunk_size).min(self.len))
    }

    /// Distinct stored chunk ids.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.chunks.iter().flatten().map(String::as_str)
    }

    /// Bytes that are not all-zero chunks.
    pub fn data_bytes(&self) -> u64 {
        self.chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_some())
            .map(|(i, _)| {
                let (s, e) = self.range(i);
                e - s
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_the_file() {
        let f = FileChunks {
            len: 2 * CHUNK_SIZE + 10,
            chunk_size: CHUNK_SIZE,
            chunks: vec![Some("a".into()), None, Some("b".into())],
        };
        assert_eq!(FileChunks::count(f.len, CHUNK_SIZE), 3);
        assert_eq!(f.range(2), (2 * CHUNK_SIZE, 2 * CHUNK_SIZE + 10));
        assert_eq!(f.data_bytes(), CHUNK_SIZE + 10);
        assert_eq!(f.ids().collect::<Vec<_>>(), ["a", "b"]);
    }
}
