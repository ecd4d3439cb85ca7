use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("i/o error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("object store request for {key} failed")]
    Store {
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("chunk {id} is missing from the store")]
    Missing { id: String },
    #[error("chunk {id} is corrupt: {reason}")]
    Corrupt { id: String, reason: String },
    #[error("object {key} is {size} bytes, more than the {max} allowed")]
    TooLarge { key: String, size: u64, max: u64 },
    #[error("invalid chunk list: {0}")]
    InvalidChunks(String),
    #[error("the bucket is locked: {0}")]
    Locked(String),
    #[error("invalid S3 settings: {0}")]
    Config(String),
    #[error("background task failed: {0}")]
    Task(String),
}

impl ChunkError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        ChunkError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Whether this error means the stored data is bad (as opposed to the
    /// store being unreachable): a restore from this snapshot cannot succeed.
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            ChunkError::Missing { .. }
                | ChunkError::Corrupt { .. }
                | ChunkError::TooLarge { .. }
                | ChunkError::InvalidChunks(_)
        )
    }
}
