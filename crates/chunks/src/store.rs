//! Upload and download of chunked files against an object store.

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt, stream};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::ChunkError;
use crate::file::{CHUNK_SIZE, FileChunks};

/// zstd level 1: guest memory compresses well already at the fastest level,
/// and capture-to-upload time matters more than the last few percent.
const ZSTD_LEVEL: i32 = 1;

/// What an upload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadReport {
    /// Size of the file.
    pub logical_bytes: u64,
    /// Compressed bytes this upload newly wrote to the store.
    pub stored_bytes: u64,
    pub chunks: u64,
    pub new_chunks: u64,
    pub zero_chunks: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DownloadReport {
    /// Compressed bytes read from the store.
    pub fetched_bytes: u64,
    pub chunks: u64,
}

/// Chunks and small objects (manifests, device state) under one key prefix.
pub struct ChunkStore {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) prefix: String,
    concurrency: usize,
    /// Chunks known to exist in the store (uploaded or seen by this process),
    /// which saves a HEAD request per chunk on repeated snapshots.
    known: Mutex<HashSet<String>>,
    /// The garbage collection epoch `known` was filled in (see `lock.rs`).
    pub(crate) gc_epoch: Mutex<Option<Bytes>>,
}

impl ChunkStore {
    /// `prefix` is prepended to every key (e.g. "" or "hatch/").
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str) -> ChunkStore {
        ChunkStore {
            store,
            prefix: prefix.to_string(),
            concurrency: 16,
            known: Mutex::default(),
            gc_epoch: Mutex::default(),
        }
    }

    /// How many chunks move at once (default 16).
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// The key of chunk `id`, relative to the prefix (like every key this
    /// store takes).
    pub fn chunk_key(&self, id: &str) -> String {
        let shard = id.get(..2).unwrap_or("xx");
        format!("chunks/{shard}/{id}")
    }

    /// The full object key in the bucket of a key relative to the prefix.
    pub fn object_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    pub(crate) fn path(&self, key: &str) -> ObjPath {
        ObjPath::from(self.object_key(key))
    }

    fn is_known(&self, id: &str) -> bool {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    fn mark_known(&self, id: &str) {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string());
    }

    /// Forget everything cached about the store's chunks (another daemon's
    /// garbage collection may have deleted any of them).
    pub(crate) fn forget_all(&self) {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Forget cached knowledge (after garbage collection deleted chunks).
    pub fn forget(&self, id: &str) {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Split `path` into chunks and upload the ones the store lacks. Call it
    /// under an upload lock ([`ChunkStore::lock_for_upload`]) held until the
    /// manifest referencing the chunks is written: a chunk found present is
    /// not uploaded again, and only the lock keeps a collection from
    /// deleting it meanwhile.
    pub async fn upload_file(&self, path: &Path) -> Result<(FileChunks, UploadReport), ChunkError> {
        let file = std::fs::File::open(path).map_err(|e| ChunkError::io(path, e))?;
        let len = file.metadata().map_err(|e| ChunkError::io(path, e))?.len();
        let file = Arc::new(file);
        let count = FileChunks::count(len, CHUNK_SIZE);
        let path_buf = path.to_path_buf();
        let results: Vec<(Option<String>, u64)> = stream::iter(0..count)
            .map(|i| {
                let file = file.clone();
                let path = path_buf.clone();
                async move { self.upload_chunk(file, path, i, len).await }
            })
            .buffered(self.concurrency)
            .try_collect()
            .await?;
        let mut report = UploadReport {
            logical_bytes: len,
            chunks: count,
            ..Default::default()
        };
        let mut chunks = Vec::with_capacity(results.len());
        for (id, stored) in results {
            match &id {
                None => report.zero_chunks += 1,
                Some(_) if stored > 0 => report.new_chunks += 1,
                Some(_) => {}
            }
            report.stored_bytes += stored;
            chunks.push(id);
        }
        Ok((
            FileChunks {
                len,
                chunk_size: CHUNK_SIZE,
                chunks,
            },
            report,
        ))
    }

    /// One chunk: read, skip if zero, hash, upload if new. Returns the id and
    /// the bytes written to the store.
    async fn upload_chunk(
        &self,
        file: Arc<std::fs::File>,
        path: PathBuf,
        index: u64,
        len: u64,
    ) -> Result<(Option<String>, u64), ChunkError> {
        let start = index * CHUNK_SIZE;
        let size = (len - start).min(CHUNK_SIZE) as usize;
        let read_path = path.clone();
        let (id, data) = blocking(move || {
            let mut buf = vec![0u8; size];
            file.read_exact_at(&mut buf, start)
                .map_err(|e| ChunkError::io(&read_path, e))?;
            if buf.iter().all(|b| *b == 0) {
                return Ok((None, buf));
            }
            let id = blake3::hash(&buf).to_hex().to_string();
            Ok((Some(id), buf))
        })
        .await?;
        let Some(id) = id else { return Ok((None, 0)) };
        if self.is_known(&id) {
            return Ok((Some(id), 0));
        }
        let key = self.chunk_key(&id);
        match self.store.head(&self.path(&key)).await {
            Ok(_) => {
                self.mark_known(&id);
                return Ok((Some(id), 0));
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(source) => return Err(ChunkError::Store { key, source }),
        }
        let compressed = blocking(move || {
            zstd::bulk::compress(&data, ZSTD_LEVEL).map_err(|e| ChunkError::io(&path, e))
        })
        .await?;
        let stored = compressed.len() as u64;
        self.put(&key, Bytes::from(compressed)).await?;
        self.mark_known(&id);
        Ok((Some(id), stored))
    }

    /// Recreate a chunked file at `path` (sparse: zero chunks are holes),
    /// verifying every chunk's hash. The file is not fsynced: callers that
    /// need it durable (rather than re-downloadable) sync it themselves.
    pub async fn download_file(
        &self,
        chunks: &FileChunks,
        path: &Path,
    ) -> Result<DownloadReport, ChunkError> {
        // Bounds are the caller's business; the structure is checked here
        // again because chunk ids become object keys.
        chunks
            .validate(u64::MAX)
            .map_err(ChunkError::InvalidChunks)?;
        let file = std::fs::File::create(path).map_err(|e| ChunkError::io(path, e))?;
        file.set_len(chunks.len)
            .map_err(|e| ChunkError::io(path, e))?;
        let file = Arc::new(file);
        let work: Vec<(usize, String)> = chunks
            .chunks
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.clone().map(|id| (i, id)))
            .collect();
        let fetched: Vec<u64> = stream::iter(work)
            .map(|(i, id)| {
                let file = file.clone();
                let (start, end) = chunks.range(i);
                let path = path.to_path_buf();
                async move {
                    let compressed = self.fetch_chunk(&id).await?;
                    let fetched = compressed.len() as u64;
                    // Decompress, verify and write in one blocking hop.
                    blocking(move || {
                        let plain = decode_verified(&id, &compressed, (end - start) as usize)?;
                        file.write_all_at(&plain, start)
                            .map_err(|e| ChunkError::io(&path, e))
                    })
                    .await?;
                    Ok(fetched)
                }
            })
            .buffer_unordered(self.concurrency)
            .try_collect()
            .await?;
        Ok(DownloadReport {
            fetched_bytes: fetched.iter().sum(),
            chunks: fetched.len() as u64,
        })
    }

    /// The plain bytes of one chunk of `len` bytes, verified against its
    /// id (a lazily served RAM image fetches chunk by chunk).
    pub async fn get_chunk(&self, id: &str, len: usize) -> Result<Vec<u8>, ChunkError> {
        if !crate::file::is_chunk_id(id) {
            return Err(ChunkError::InvalidChunks(format!("bad chunk id {id:?}")));
        }
        let compressed = self.fetch_chunk(id).await?;
        let id = id.to_string();
        blocking(move || decode_verified(&id, &compressed, len)).await
    }

    /// The compressed bytes of a chunk; `Missing` if the store lacks it.
    async fn fetch_chunk(&self, id: &str) -> Result<Bytes, ChunkError> {
        match self.get(&self.chunk_key(id), max_compressed_chunk()).await {
            Ok(b) => Ok(b),
            Err(ChunkError::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => {
                self.forget(id);
                Err(ChunkError::Missing { id: id.to_string() })
            }
            Err(e) => Err(e),
        }
    }

    /// Write a small object (manifest, device state) under the prefix.
    pub async fn put(&self, key: &str, data: Bytes) -> Result<(), ChunkError> {
        self.store
            .put(&self.path(key), PutPayload::from_bytes(data))
            .await
            .map_err(|source| ChunkError::Store {
                key: key.to_string(),
                source,
            })?;
        Ok(())
    }

    /// Read an object of at most `max` bytes (what is read back from the
    /// bucket is not trusted to be of a sane size).
    pub async fn get(&self, key: &str, max: u64) -> Result<Bytes, ChunkError> {
        let store_err = |source| ChunkError::Store {
            key: key.to_string(),
            source,
        };
        let result = self.store.get(&self.path(key)).await.map_err(store_err)?;
        let too_large = |size| ChunkError::TooLarge {
            key: key.to_string(),
            size,
            max,
        };
        if result.meta.size > max {
            return Err(too_large(result.meta.size));
        }
        let bytes = result.bytes().await.map_err(store_err)?;
        if bytes.len() as u64 > max {
            return Err(too_large(bytes.len() as u64));
        }
        Ok(bytes)
    }

    pub async fn delete(&self, key: &str) -> Result<(), ChunkError> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(ChunkError::Store {
                key: key.to_string(),
                source,
            }),
        }
    }

    /// Delete a chunk (garbage collection).
    pub async fn delete_chunk(&self, id: &str) -> Result<(), ChunkError> {
        self.forget(id);
        self.delete(&self.chunk_key(id)).await
    }

    /// Keys under `prefix` (relative to the store prefix).
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, ChunkError> {
        Ok(self
            .list_meta(prefix)
            .await?
            .into_iter()
            .map(|m| m.location.to_string())
            .filter_map(|k| k.strip_prefix(&self.prefix).map(String::from))
            .collect())
    }

    /// Objects under `prefix` (relative to the store prefix).
    pub(crate) async fn list_meta(
        &self,
        prefix: &str,
    ) -> Result<Vec<object_store::ObjectMeta>, ChunkError> {
        let full = self.object_key(prefix);
        self.store
            .list(Some(&self.path(prefix)))
            .try_collect()
            .await
            .map_err(|source| ChunkError::Store { key: full, source })
    }
}

/// Largest compressed chunk a well-formed store holds: zstd's bound for a
/// full chunk of incompressible data.
fn max_compressed_chunk() -> u64 {
    zstd::zstd_safe::compress_bound(CHUNK_SIZE as usize) as u64
}

/// Decompress a chunk of `len` bytes and check that it hashes to its name.
/// Decompression stops at `len` bytes: a chunk that would inflate beyond
/// what the file needs is corrupt, not a reason to allocate gigabytes.
fn decode_verified(id: &str, compressed: &[u8], len: usize) -> Result<Vec<u8>, ChunkError> {
    let corrupt = |reason: String| ChunkError::Corrupt {
        id: id.to_string(),
        reason,
    };
    let plain = zstd::bulk::decompress(compressed, len)
        .map_err(|e| corrupt(format!("cannot decompress into {len} bytes: {e}")))?;
    if plain.len() != len {
        return Err(corrupt(format!(
            "expected {len} bytes, got {}",
            plain.len()
        )));
    }
    let actual = blake3::hash(&plain).to_hex();
    if actual.as_str() != id {
        return Err(ChunkError::Corrupt {
            id: id.to_string(),
            reason: format!("content hashes to {actual}"),
        });
    }
    Ok(plain)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ChunkError> + Send + 'static,
) -> Result<T, ChunkError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ChunkError::Task(e.to_string()))?
}
