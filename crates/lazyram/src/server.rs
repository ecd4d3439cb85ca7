//! The lazy RAM server: mounts the FUSE file, fills the cache in the
//! background, answers the daemon, and ends cleanly (dirty pages synced,
//! what is here recorded) when told to or when its QEMU is gone.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use crate::LazyRamError;
use crate::cache::{RamCache, Status};
use crate::control::{Request, Response, read_line};
use crate::fs::RamFs;
use crate::source::{ChunkSource, Layout};

/// The file's name in the mount.
pub const RAM_FILE: &str = "ram";

/// A stored chunk's id, or `None` for an all-zero chunk.
pub type SpecChunk = Option<String>;

/// Everything the server needs, written by the daemon as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerSpec {
    /// An empty directory to mount on; the image is `<mount_dir>/ram`.
    pub mount_dir: PathBuf,
    /// The local cache (created sparse, or reused with `present`).
    pub cache_file: PathBuf,
    pub control_socket: PathBuf,
    pub len: u64,
    pub chunk_size: u64,
    pub chunks: Vec<SpecChunk>,
    /// Chunks already in `cache_file` (empty: none).
    #[serde(default)]
    pub present: Vec<bool>,
    /// Chunks to fetch first (what the guest touched first last time).
    #[serde(default)]
    pub first: Vec<u32>,
    /// Background fetches at once.
    pub fill_concurrency: usize,
    /// Least time between two background fetches, in ms (0: no limit): a
    /// fill that leaves the store's bandwidth to demand fetches.
    #[serde(default)]
    pub fill_pace_ms: u64,
}

impl ServerSpec {
    /// Check what a daemon wrote (the server trusts nothing it reads).
    pub fn validate(&self) -> Result<Layout, LazyRamError> {
        let bad = |m: String| Err(LazyRamError::Spec(m));
        if self.chunk_size == 0 || !self.chunk_size.is_multiple_of(4096) {
            return bad(format!("chunk size {}", self.chunk_size));
        }
        if self.len.div_ceil(self.chunk_size) != self.chunks.len() as u64 {
            return bad(format!(
                "{} chunks for {} bytes",
                self.chunks.len(),
                self.len
            ));
        }
        if !self.present.is_empty() && self.present.len() != self.chunks.len() {
            return bad(format!("{} presence flags", self.present.len()));
        }
        if self.fill_concurrency == 0 || self.fill_concurrency > 64 {
            return bad(format!("fill concurrency {}", self.fill_concurrency));
        }
        Ok(Layout {
            len: self.len,
            chunk_size: self.chunk_size,
            zero: self.chunks.iter().map(Option::is_none).collect(),
        })
    }

    /// Where the server records, when it ends, which chunks the cache holds
    /// and which the guest wrote.
    pub fn end_status_file(&self) -> PathBuf {
        let mut name = self.cache_file.as_os_str().to_owned();
        name.push(".status.json");
        PathBuf::from(name)
    }
}

/// What the server leaves behind when it ends (see
/// [`ServerSpec::end_status_file`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndStatus {
    pub status: Status,
    pub present: Vec<bool>,
}

pub struct Server;

impl Server {
    /// Serve until stopped (or the watched QEMU exits). Must run inside a
    /// multi-threaded Tokio runtime.
    pub async fn run(
        spec: ServerSpec,
        source: Arc<dyn ChunkSource>,
    ) -> Result<EndStatus, LazyRamError> {
        let layout = spec.validate()?;
        let cache = Arc::new(RamCache::open(
            &spec.cache_file,
            layout,
            &spec.present,
            source,
        )?);
        let fs = RamFs::new(cache.clone(), tokio::runtime::Handle::current());
        let options = [
            fuser::MountOption::FSName("hatch-lazyram".into()),
            fuser::MountOption::RW,
            fuser::MountOption::NoAtime,
            fuser::MountOption::NoDev,
            fuser::MountOption::NoSuid,
            fuser::MountOption::NoExec,
        ];
        let session = fuser::spawn_mount2(fs, &spec.mount_dir, &options).map_err(|e| {
            LazyRamError::io(format!("mounting on {}", spec.mount_dir.display()), e)
        })?;
        relax_writeback_limit(&spec.mount_dir);
        let _ = std::fs::remove_file(&spec.control_socket);
        let listener = UnixListener::bind(&spec.control_socket).map_err(|e| {
            LazyRamError::io(format!("listening on {}", spec.control_socket.display()), e)
        })?;
        tracing::info!(mount = %spec.mount_dir.display(), chunks = spec.chunks.len(),
            present = cache.status().present, "lazy RAM served");

        let fill = {
            let (cache, first, n) = (cache.clone(), spec.first.clone(), spec.fill_concurrency);
            let pace = Duration::from_millis(spec.fill_pace_ms);
            tokio::spawn(async move {
                cache.fill(&first, n, pace).await;
                tracing::info!("lazy RAM complete");
            })
        };
        // A stop, with where to answer once the end status is written (a
        // stop because the watched QEMU exited has no one to answer).
        let (stop_tx, mut stop_rx) = mpsc::channel::<Option<Reply>>(4);
        let ram = spec.mount_dir.join(RAM_FILE);
        let reply = loop {
            tokio::select! {
                stop = stop_rx.recv() => break stop.flatten(),
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let (cache, ram, stop) = (cache.clone(), ram.clone(), stop_tx.clone());
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, &cache, &ram, &stop).await {
                            tracing::warn!(error = %e, "lazy RAM control request failed");
                        }
                    });
                }
            }
        };
        fill.abort();
        let ended = write_end_status(&spec, &ram, &cache).await;
        if let Some(reply) = reply {
            let _ = reply.answer.send(match &ended {
                Ok(end) => Ok(end.status.clone()),
                Err(e) => Err(e.to_string()),
            });
            // The answer is written by the request's task: wait for it
            // before the process may exit.
            let _ = tokio::time::timeout(Duration::from_secs(2), reply.written).await;
        }
        drop(session); // unmounts
        let _ = std::fs::remove_file(&spec.control_socket);
        ended
    }
}

/// Where a stop is answered: the status at the end, or why it could not be
/// recorded.
struct Reply {
    answer: oneshot::Sender<Result<Status, String>>,
    written: oneshot::Receiver<()>,
}

/// Sync the guest's writes into the cache file, then record what it holds.
/// The end status file exists only if the sync succeeded: it is the proof
/// that the cache file holds everything the guest wrote.
async fn write_end_status(
    spec: &ServerSpec,
    ram: &Path,
    cache: &Arc<RamCache>,
) -> Result<EndStatus, LazyRamError> {
    sync_through_mount(ram, cache).await?;
    let end = EndStatus {
        status: cache.status(),
        present: cache.present(),
    };
    let json = serde_json::to_vec(&end).map_err(|e| LazyRamError::Control(e.to_string()))?;
    let path = spec.end_status_file();
    let part = path.with_extension("part");
    std::fs::write(&part, json)
        .and_then(|()| std::fs::rename(&part, &path))
        .map_err(|e| LazyRamError::io(format!("writing {}", path.display()), e))?;
    Ok(end)
}

async fn answer(
    stream: tokio::net::UnixStream,
    cache: &Arc<RamCache>,
    ram: &Path,
    stop: &mpsc::Sender<Option<Reply>>,
) -> Result<(), LazyRamError> {
    let (read, mut write) = stream.into_split();
    let line = read_line(read).await?;
    // Set once the answer is written (a stop waits for it).
    let (written_tx, written_rx) = oneshot::channel();
    let resp = match serde_json::from_slice::<Request>(&line) {
        Err(e) => failed(format!("bad request: {e}")),
        Ok(Request::Status) => ok(cache.status()),
        Ok(Request::Sync) => match sync_through_mount(ram, cache).await {
            Ok(()) => ok(cache.status()),
            Err(e) => failed(e.to_string()),
        },
        Ok(Request::Watch { pid }) => {
            let stop = stop.clone();
            tokio::spawn(async move {
                while Path::new(&format!("/proc/{pid}")).exists() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                tracing::info!(pid, "the watched process is gone; ending");
                let _ = stop.send(None).await;
            });
            ok(cache.status())
        }
        Ok(Request::Stop) => {
            let (tx, rx) = oneshot::channel();
            let reply = Reply {
                answer: tx,
                written: written_rx,
            };
            let _ = stop.send(Some(reply)).await;
            match rx.await {
                Ok(Ok(status)) => ok(status),
                Ok(Err(e)) => failed(format!("ending: {e}")),
                // Another stop (or the watch) ended the server first.
                Err(_) => failed("the server was ending already".into()),
            }
        }
    };
    let mut out = serde_json::to_vec(&resp).map_err(|e| LazyRamError::Control(e.to_string()))?;
    out.push(b'\n');
    let written = write
        .write_all(&out)
        .await
        .map_err(|e| LazyRamError::io("answering a lazy RAM request", e));
    let _ = written_tx.send(());
    written
}

fn ok(status: Status) -> Response {
    Response {
        ok: true,
        status: Some(status),
        error: None,
    }
}

fn failed(error: String) -> Response {
    Response {
        ok: false,
        status: None,
        error: Some(error),
    }
}

/// Have the kernel write the file's dirty pages back to us (fsync through
/// the mount: the writes arrive as FUSE writes on the session's thread),
/// then make the cache file durable.
async fn sync_through_mount(ram: &Path, cache: &Arc<RamCache>) -> Result<(), LazyRamError> {
    let path = ram.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let f = std::fs::OpenOptions::new().write(true).open(&path)?;
        f.sync_all()
    })
    .await
    .map_err(|e| LazyRamError::io("a blocking task", std::io::Error::other(e)))?
    .map_err(|e| LazyRamError::io(format!("syncing {}", ram.display()), e))?;
    cache.sync().await
}

/// FUSE mounts get a strict dirty-page limit (1% of the dirty threshold):
/// a guest writing its memory fast would be throttled to it. As root the
/// limit can be lifted for this mount (Linux 6.2+); elsewhere it stays.
fn relax_writeback_limit(mount_dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(mount_dir) else {
        return;
    };
    let dev = meta.dev();
    let bdi = format!("/sys/class/bdi/{}:{}", libc::major(dev), libc::minor(dev));
    for (knob, value) in [("strict_limit", "0"), ("max_ratio", "100")] {
        if let Err(e) = std::fs::write(format!("{bdi}/{knob}"), value) {
            tracing::debug!(%bdi, knob, error = %e, "writeback limit left as it is");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ServerSpec {
        ServerSpec {
            mount_dir: "/m".into(),
            cache_file: "/c".into(),
            control_socket: "/s".into(),
            len: 3 << 20,
            chunk_size: 1 << 20,
            chunks: vec![Some("a".into()), None, Some("b".into())],
            present: Vec::new(),
            first: vec![7],
            fill_concurrency: 4,
            fill_pace_ms: 0,
        }
    }

    #[test]
    fn a_spec_is_checked_before_anything_is_served() {
        let layout = spec().validate().expect("valid");
        assert_eq!(layout.zero, vec![false, true, false]);
        let bad: [fn(&mut ServerSpec); 5] = [
            |s| s.chunk_size = 1000,
            |s| s.chunk_size = 0,
            |s| s.len = 5 << 20,
            |s| s.present = vec![true],
            |s| s.fill_concurrency = 0,
        ];
        for (i, breaks) in bad.iter().enumerate() {
            let mut s = spec();
            breaks(&mut s);
            assert!(
                matches!(s.validate(), Err(LazyRamError::Spec(_))),
                "case {i}"
            );
        }
        assert_eq!(spec().end_status_file(), PathBuf::from("/c.status.json"));
    }
}
