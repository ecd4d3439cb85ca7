//! The local cache file behind the FUSE file: which chunks are here, which
//! the guest wrote, which it asked for first; fetching on demand with
//! retries, and the background fill.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use crate::LazyRamError;
use crate::source::{ChunkSource, FetchError, Layout};

/// The first retry of a failed fetch waits this long, doubling up to
/// [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What the cache holds and how fetching goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub chunks: usize,
    /// Chunks in the cache file (fetched, or all zeros).
    pub present: usize,
    pub complete: bool,
    /// Chunks the guest wrote (through the kernel's writeback), ascending.
    pub dirty: Vec<u32>,
    /// Chunks the guest asked for, in the order it first did (the
    /// background fill's own fetches are not in it).
    pub touched: Vec<u32>,
    /// Chunks fetched from the source, and their plain bytes.
    pub fetched_chunks: u64,
    pub fetched_bytes: u64,
    /// The last fetch failed with this, and no fetch succeeded since.
    pub failing: Option<String>,
    /// A fetch got bytes that were not the chunk (since the start).
    pub corrupt_seen: bool,
    /// What the first such fetch said (it names the chunk).
    #[serde(default)]
    pub corruption: Option<String>,
}

/// A RAM image in a local file, completed from a [`ChunkSource`].
pub struct RamCache {
    file: File,
    layout: Layout,
    source: Arc<dyn ChunkSource>,
    /// Set once chunk `i` is in the file; the cell also makes concurrent
    /// demands for one chunk wait for a single fetch.
    here: Vec<OnceCell<()>>,
    dirty: Vec<AtomicBool>,
    demanded: Vec<AtomicBool>,
    touched: Mutex<Vec<u32>>,
    fetched_chunks: AtomicU64,
    fetched_bytes: AtomicU64,
    consecutive_failures: AtomicU64,
    last_failure: Mutex<Option<String>>,
    /// What the first corrupt fetch said (`Status::corrupt_seen` is
    /// whether there was one).
    corruption: Mutex<Option<String>>,
}

impl RamCache {
    /// A cache in `path` (created, or reused: `present[i]` says chunk `i`
    /// is already in it and right). All-zero chunks count as present.
    pub fn open(
        path: &Path,
        layout: Layout,
        present: &[bool],
        source: Arc<dyn ChunkSource>,
    ) -> Result<RamCache, LazyRamError> {
        let what = || format!("opening the RAM cache {}", path.display());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| LazyRamError::io(what(), e))?;
        file.set_len(layout.len)
            .map_err(|e| LazyRamError::io(what(), e))?;
        let n = layout.chunks();
        let here = (0..n)
            .map(|i| {
                if layout.zero[i] || present.get(i).copied().unwrap_or(false) {
                    OnceCell::new_with(Some(()))
                } else {
                    OnceCell::new()
                }
            })
            .collect();
        Ok(RamCache {
            file,
            here,
            dirty: (0..n).map(|_| AtomicBool::new(false)).collect(),
            demanded: (0..n).map(|_| AtomicBool::new(false)).collect(),
            touched: Mutex::default(),
            fetched_chunks: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
            consecutive_failures: AtomicU64::new(0),
            last_failure: Mutex::default(),
            corruption: Mutex::new(None),
            layout,
            source,
        })
    }

    pub fn len(&self) -> u64 {
        self.layout.len
    }

    pub fn is_empty(&self) -> bool {
        self.layout.len == 0
    }

    /// Bytes `[offset, offset + len)` (cut at the end of the image), once
    /// the chunks they lie in are here. Never fails for want of the source:
    /// it waits (retrying) instead. Errors are local I/O errors only.
    pub async fn read(self: &Arc<Self>, offset: u64, len: u32) -> Result<Vec<u8>, LazyRamError> {
        let end = (offset + u64::from(len)).min(self.layout.len);
        if offset >= end {
            return Ok(Vec::new());
        }
        self.demand(offset, end - offset).await;
        let me = self.clone();
        blocking(move || {
            let mut buf = vec![0u8; (end - offset) as usize];
            me.file
                .read_exact_at(&mut buf, offset)
                .map_err(|e| LazyRamError::io("reading the RAM cache", e))?;
            Ok(buf)
        })
        .await
    }

    /// Write `data` at `offset` (the guest's pages coming back); the
    /// chunks it touches are fetched first (a write may cover part of one)
    /// and recorded as dirty. Returns the bytes written.
    pub async fn write(
        self: &Arc<Self>,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<usize, LazyRamError> {
        let end = (offset + data.len() as u64).min(self.layout.len);
        if offset >= end {
            return Ok(0);
        }
        self.demand(offset, end - offset).await;
        for i in self.layout.chunks_of(offset, end - offset) {
            self.dirty[i].store(true, Ordering::Release);
        }
        let me = self.clone();
        let n = (end - offset) as usize;
        blocking(move || {
            me.file
                .write_all_at(&data[..n], offset)
                .map_err(|e| LazyRamError::io("writing the RAM cache", e))?;
            Ok(n)
        })
        .await
    }

    /// Make the cache file durable (the dirty pages written back so far).
    pub async fn sync(self: &Arc<Self>) -> Result<(), LazyRamError> {
        let me = self.clone();
        blocking(move || {
            me.file
                .sync_data()
                .map_err(|e| LazyRamError::io("syncing the RAM cache", e))
        })
        .await
    }

    /// Fetch every missing chunk, `first` in its order with `concurrency`
    /// fetches at a time, then the rest in file order with a quarter of
    /// that (the guest, now running, needs the CPU more than the rest of
    /// its memory soon), a new fetch at most every `pace` (zero: no limit).
    /// Returns when all are here.
    pub async fn fill(self: &Arc<Self>, first: &[u32], concurrency: usize, pace: Duration) {
        let n = self.layout.chunks();
        let mut seen = vec![false; n];
        let mut order = Vec::with_capacity(n);
        for &i in first {
            let i = i as usize;
            if i < n && !std::mem::replace(&mut seen[i], true) {
                order.push(i);
            }
        }
        let rest: Vec<usize> = (0..n).filter(|&i| !seen[i]).collect();
        self.fetch_all(order, concurrency.max(1), pace).await;
        self.fetch_all(rest, (concurrency / 4).max(1), pace).await;
    }

    async fn fetch_all(self: &Arc<Self>, chunks: Vec<usize>, concurrency: usize, pace: Duration) {
        futures_util::stream::iter(chunks)
            .then(|i| async move {
                if !pace.is_zero() && !self.is_here(i) {
                    tokio::time::sleep(pace).await;
                }
                i
            })
            .for_each_concurrent(concurrency, |i| async move { self.ensure(i).await })
            .await;
    }

    pub fn status(&self) -> Status {
        let corruption = lock(&self.corruption).clone();
        let present = self.here.iter().filter(|c| c.initialized()).count();
        let failing = if self.consecutive_failures.load(Ordering::Acquire) > 0 {
            lock(&self.last_failure).clone()
        } else {
            None
        };
        Status {
            chunks: self.layout.chunks(),
            present,
            complete: present == self.layout.chunks(),
            dirty: (0..self.layout.chunks())
                .filter(|&i| self.dirty[i].load(Ordering::Acquire))
                .map(|i| i as u32)
                .collect(),
            touched: lock(&self.touched).clone(),
            fetched_chunks: self.fetched_chunks.load(Ordering::Acquire),
            fetched_bytes: self.fetched_bytes.load(Ordering::Acquire),
            failing,
            corrupt_seen: corruption.is_some(),
            corruption,
        }
    }

    /// Which chunks are in the cache file.
    pub fn present(&self) -> Vec<bool> {
        self.here.iter().map(OnceCell::initialized).collect()
    }

    fn is_here(&self, i: usize) -> bool {
        self.here.get(i).is_some_and(OnceCell::initialized)
    }

    /// The guest needs `[offset, offset + len)`: note the chunks as
    /// touched and wait until they are here.
    async fn demand(self: &Arc<Self>, offset: u64, len: u64) {
        let range = self.layout.chunks_of(offset, len);
        for i in range.clone() {
            if !self.demanded[i].swap(true, Ordering::AcqRel) {
                lock(&self.touched).push(i as u32);
            }
        }
        futures_util::future::join_all(range.map(|i| self.ensure(i))).await;
    }

    async fn ensure(&self, i: usize) {
        self.here[i].get_or_init(|| self.fetch_into(i)).await;
    }

    /// Fetch chunk `i` into the file, retrying until it works.
    async fn fetch_into(&self, i: usize) {
        let (start, end) = self.layout.range(i);
        let mut backoff = FIRST_BACKOFF;
        loop {
            let (err, corrupt) = match self.source.fetch(i).await {
                Ok(data) if data.len() as u64 == end - start => {
                    // Inline: a 1 MiB write into the page cache takes well under
                    // a millisecond, less than a hop to the blocking pool.
                    let written = self.file.write_all_at(&data, start);
                    match written {
                        Ok(()) => {
                            self.fetched_chunks.fetch_add(1, Ordering::AcqRel);
                            self.fetched_bytes
                                .fetch_add(data.len() as u64, Ordering::AcqRel);
                            self.consecutive_failures.store(0, Ordering::Release);
                            return;
                        }
                        Err(e) => (format!("chunk {i}: writing the RAM cache: {e}"), false),
                    }
                }
                Ok(data) => (
                    format!(
                        "chunk {i}: corrupt: {} bytes instead of {}",
                        data.len(),
                        end - start
                    ),
                    true,
                ),
                Err(e) => {
                    let corrupt = matches!(e, FetchError::Corrupt(_));
                    (format!("chunk {i}: {e}"), corrupt)
                }
            };
            tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, "lazy RAM fetch failed");
            if corrupt {
                lock(&self.corruption).get_or_insert_with(|| err.clone());
            }
            *lock(&self.last_failure) = Some(err);
            self.consecutive_failures.fetch_add(1, Ordering::AcqRel);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LazyRamError> + Send + 'static,
) -> Result<T, LazyRamError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LazyRamError::io("a blocking task", std::io::Error::other(e)))?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::AtomicUsize;

    const CHUNK: u64 = 64 << 10;

    /// Chunk `i` is filled with byte `i + 1`; fetches are counted; it can be
    /// made to fail or to answer short.
    struct Fake {
        fetches: Vec<AtomicUsize>,
        down: AtomicBool,
        short: AtomicBool,
        order: Mutex<Vec<usize>>,
    }

    impl Fake {
        fn new(n: usize) -> Arc<Fake> {
            Arc::new(Fake {
                fetches: (0..n).map(|_| AtomicUsize::new(0)).collect(),
                down: AtomicBool::new(false),
                short: AtomicBool::new(false),
                order: Mutex::default(),
            })
        }
        fn count(&self, i: usize) -> usize {
            self.fetches[i].load(Ordering::SeqCst)
        }
    }

    #[async_trait::async_trait]
    impl ChunkSource for Fake {
        async fn fetch(&self, i: usize) -> Result<Vec<u8>, FetchError> {
            self.fetches[i].fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err(FetchError::Unavailable("store down".into()));
            }
            lock(&self.order).push(i);
            let len = if self.short.load(Ordering::SeqCst) {
                10
            } else {
                CHUNK as usize
            };
            Ok(vec![i as u8 + 1; len])
        }
    }

    fn layout(n: usize, zero: &[usize]) -> Layout {
        Layout {
            len: n as u64 * CHUNK,
            chunk_size: CHUNK,
            zero: (0..n).map(|i| zero.contains(&i)).collect(),
        }
    }

    fn cache(
        n: usize,
        zero: &[usize],
        present: &[bool],
    ) -> (tempfile::TempDir, Arc<RamCache>, Arc<Fake>) {
        let dir = tempfile::tempdir().unwrap();
        let fake = Fake::new(n);
        let c = RamCache::open(
            &dir.path().join("cache"),
            layout(n, zero),
            present,
            fake.clone(),
        )
        .unwrap();
        (dir, Arc::new(c), fake)
    }

    #[tokio::test]
    async fn a_read_fetches_only_the_chunks_it_spans_and_only_once() {
        let (_d, c, fake) = cache(4, &[], &[]);
        // The last 100 bytes of chunk 1 and the first 100 of chunk 2.
        let data = c.read(2 * CHUNK - 100, 200).await.unwrap();
        assert_eq!(&data[..100], &[2u8; 100]);
        assert_eq!(&data[100..], &[3u8; 100]);
        let again = futures_util::future::join_all((0..8).map(|_| c.read(CHUNK, 4096))).await;
        assert!(
            again
                .iter()
                .all(|d| d.as_ref().unwrap() == &vec![2u8; 4096])
        );
        assert_eq!([0, 1, 1, 0], [0, 1, 2, 3].map(|i| fake.count(i)));
        let s = c.status();
        assert_eq!(
            (s.present, s.complete, s.touched.clone()),
            (2, false, vec![1, 2])
        );
        assert!(s.dirty.is_empty());
    }

    #[tokio::test]
    async fn zero_and_present_chunks_are_never_fetched() {
        let (_d, c, fake) = cache(3, &[1], &[true, false, false]);
        assert_eq!(c.read(CHUNK, 16).await.unwrap(), vec![0u8; 16]);
        c.read(0, 16).await.unwrap(); // present: whatever the file holds
        assert_eq!((fake.count(0), fake.count(1)), (0, 0));
        assert_eq!(c.status().present, 2);
    }

    #[tokio::test]
    async fn reads_past_the_end_are_cut() {
        let (_d, c, _) = cache(2, &[], &[]);
        assert_eq!(c.read(2 * CHUNK - 8, 4096).await.unwrap().len(), 8);
        assert!(c.read(2 * CHUNK, 4096).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_write_fetches_its_chunk_first_and_marks_it_dirty() {
        let (_d, c, fake) = cache(3, &[], &[]);
        assert_eq!(c.write(CHUNK + 10, vec![0xAB; 20]).await.unwrap(), 20);
        assert_eq!(fake.count(1), 1);
        let back = c.read(CHUNK, 40).await.unwrap();
        assert_eq!(&back[..10], &[2u8; 10]); // the rest of the chunk kept
        assert_eq!(&back[10..30], &[0xAB; 20]);
        assert_eq!(&back[30..], &[2u8; 10]);
        assert_eq!(c.status().dirty, vec![1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_waits_out_a_store_outage_and_reports_it() {
        let (_d, c, fake) = cache(2, &[], &[]);
        fake.down.store(true, Ordering::SeqCst);
        let reader = tokio::spawn({
            let c = c.clone();
            async move { c.read(0, 8).await.unwrap() }
        });
        // Several retries later, still waiting, and the status says why.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!reader.is_finished());
        assert!(fake.count(0) >= 4, "{} attempts", fake.count(0));
        let failing = c.status().failing.unwrap();
        assert!(failing.contains("store down"), "{failing}");
        fake.down.store(false, Ordering::SeqCst);
        assert_eq!(reader.await.unwrap(), vec![1u8; 8]);
        assert_eq!(c.status().failing, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_chunk_is_corruption_and_is_not_served() {
        let (_d, c, fake) = cache(1, &[], &[]);
        fake.short.store(true, Ordering::SeqCst);
        let reader = tokio::spawn({
            let c = c.clone();
            async move { c.read(0, 8).await.unwrap() }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!reader.is_finished());
        assert!(c.status().corrupt_seen);
        fake.short.store(false, Ordering::SeqCst);
        assert_eq!(reader.await.unwrap(), vec![1u8; 8]);
    }

    #[tokio::test]
    async fn the_fill_fetches_the_first_ones_first_then_everything_once() {
        let (_d, c, fake) = cache(6, &[4], &[]);
        c.read(0, 1).await.unwrap();
        c.fill(&[5, 3, 5, 99], 1, Duration::ZERO).await;
        let s = c.status();
        assert!(s.complete);
        assert_eq!(*lock(&fake.order), vec![0, 5, 3, 1, 2]);
        assert_eq!(s.fetched_chunks, 5);
        assert_eq!(s.touched, vec![0]); // the fill's fetches are not the guest's
        assert_eq!(c.present(), vec![true; 6]);
    }
}
