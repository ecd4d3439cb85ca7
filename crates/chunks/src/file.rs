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

    /// Check the structure of a chunk list read from storage (hostile until
    /// checked): the chunk size Hatch writes, a chunk per `chunk_size` bytes
    /// of `len`, at most `max_len` bytes, and chunk ids that are BLAKE3 hex
    /// digests (they become object keys).
    pub fn validate(&self, max_len: u64) -> Result<(), String> {
        if self.chunk_size != CHUNK_SIZE {
            return Err(format!(
                "chunk size {} (expected {CHUNK_SIZE})",
                self.chunk_size
            ));
        }
        if self.len > max_len {
            return Err(format!("{} bytes (at most {max_len} allowed)", self.len));
        }
        let count = FileChunks::count(self.len, self.chunk_size);
        if self.chunks.len() as u64 != count {
            return Err(format!(
                "{} chunks for {} bytes (expected {count})",
                self.chunks.len(),
                self.len
            ));
        }
        if let Some(bad) = self.ids().find(|id| !is_chunk_id(id)) {
            return Err(format!("chunk id {bad:?} is not a BLAKE3 hex digest"));
        }
        Ok(())
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

/// A chunk id: the 64 lowercase hex digits of a BLAKE3 hash.
pub fn is_chunk_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
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

    #[test]
    fn validation_rejects_what_hatch_never_writes() {
        let id = "ab".repeat(32);
        let good = FileChunks {
            len: CHUNK_SIZE + 1,
            chunk_size: CHUNK_SIZE,
            chunks: vec![Some(id.clone()), None],
        };
        assert_eq!(good.validate(CHUNK_SIZE * 2), Ok(()));
        assert!(good.validate(CHUNK_SIZE).unwrap_err().contains("at most"));
        let mut f = good.clone();
        f.chunk_size = 4096;
        assert!(f.validate(u64::MAX).unwrap_err().contains("chunk size"));
        let mut f = good.clone();
        f.chunks.push(None);
        assert!(f.validate(u64::MAX).unwrap_err().contains("expected 2"));
        for bad in ["../../etc/passwd", "AB", &"AB".repeat(32), &"g".repeat(64)] {
            let mut f = good.clone();
            f.chunks[0] = Some(bad.to_string());
            assert!(f.validate(u64::MAX).is_err(), "{bad}");
        }
    }
}
