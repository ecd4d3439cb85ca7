//! Lazy wake: a wake from S3 starts the guest before its memory is here.
//!
//! The snapshot's device state and disk layers are fetched first (small);
//! its RAM image is served by a `hatch lazyram` process of its own (the
//! `hatch-lazyram` crate): a FUSE file QEMU maps as the guest's RAM, whose
//! chunks come from S3 when the guest first reads them while a background
//! fill fetches the rest into the VM's RAM file (`<vm>/mem`, the cache).
//!
//! Rules that keep the guest's memory safe (docs/ARCHITECTURE.md, "Lazy
//! wake"):
//! - The RAM file of a lazily woken VM carries a marker (`mem.lazy`). It is
//!   taken as a memory image only once the server has ended after syncing
//!   the guest's writes into it with every chunk present, which its end
//!   status file records (it is written only after the sync).
//! - A capture waits, with the guest running, until the fill is complete
//!   (or fails after `lazy_fill_timeout`, the VM running on); it pauses only
//!   afterwards, so the pause is what it is without lazy memory.
//! - The server watches its QEMU and ends by itself when it exits, so a
//!   daemon killed at any point leaves no server behind once QEMU is gone;
//!   the daemon at start-up ends those it finds without a QEMU.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hatch_chunks::{ChunkStore, FileChunks};
use hatch_lazyram::control::{self, Request};
use hatch_lazyram::{ChunkSource, EndStatus, FetchError, RAM_FILE, Server, ServerSpec};
use serde::{Deserialize, Serialize};

use crate::manager::VmManager;

/// Background fetches at once: enough to keep a local S3 busy without
/// starving the guest's own demand fetches.
const FILL_CONCURRENCY: usize = 8;
/// Longest a server may take to mount and answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a server may take to sync and end once told to.
const END_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a VM's lazy RAM server keeps its things (the run dir: short
/// socket paths), and the marker and end status next to its RAM file.
pub(crate) struct LazyPaths {
    pub mount: PathBuf,
    pub socket: PathBuf,
    pub spec: PathBuf,
    pub pid: PathBuf,
    pub log: PathBuf,
    /// Present while the VM's RAM file is a lazily filled cache; holds the
    /// id of the snapshot it is filled from.
    pub marker: PathBuf,
    /// Written by the server when it ends, after the sync.
    pub end_status: PathBuf,
    /// The prefetch list the RAM file carries from the wake that placed it
    /// (a local one), for the next snapshot.
    pub prefetch: PathBuf,
}

/// What `hatch lazyram --spec FILE` reads: the server's spec and how to
/// reach the bucket. Written 0600 in the run dir, removed once read.
#[derive(Serialize, Deserialize)]
pub struct ProcessSpec {
    server: ServerSpec,
    s3: S3Spec,
}

#[derive(Serialize, Deserialize)]
struct S3Spec {
    endpoint: String,
    bucket: String,
    region: String,
    access_key_id: String,
    secret_access_key: String,
}

/// The body of `hatch lazyram --spec FILE`: serve until told to stop or
/// until the watched QEMU exits.
pub async fn run_process(spec_file: &Path) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(spec_file).with_context(|| format!("reading {}", spec_file.display()))?;
    // It holds the bucket's secret: gone once read.
    let _ = std::fs::remove_file(spec_file);
    let spec: ProcessSpec = serde_json::from_slice(&bytes).context("parsing the lazy RAM spec")?;
    let object_store = hatch_chunks::s3::connect(&hatch_chunks::s3::S3Settings {
        endpoint: spec.s3.endpoint,
        bucket: spec.s3.bucket,
        region: spec.s3.region,
        access_key_id: spec.s3.access_key_id,
        secret_access_key: spec.s3.secret_access_key,
    })?;
    let source = S3Source {
        store: ChunkStore::new(object_store, ""),
        chunks: FileChunks {
            len: spec.server.len,
            chunk_size: spec.server.chunk_size,
            chunks: spec.server.chunks.clone(),
        },
    };
    let end = Server::run(spec.server, Arc::new(source)).await?;
    tracing::info!(
        present = end.status.present,
        chunks = end.status.chunks,
        dirty = end.status.dirty.len(),
        fetched_bytes = end.status.fetched_bytes,
        "lazy RAM server ended"
    );
    Ok(())
}

/// Chunks of a snapshot's memory image, read from the bucket and verified.
struct S3Source {
    store: ChunkStore,
    chunks: FileChunks,
}

#[async_trait::async_trait]
impl ChunkSource for S3Source {
    async fn fetch(&self, index: usize) -> Result<Vec<u8>, FetchError> {
        let (start, end) = self.chunks.range(index);
        let len = (end - start) as usize;
        match self.chunks.chunks.get(index) {
            Some(Some(id)) => self.store.get_chunk(id, len).await.map_err(|e| match e {
                e if e.is_corruption() => FetchError::Corrupt(e.to_string()),
                e => FetchError::Unavailable(e.to_string()),
            }),
            Some(None) => Ok(vec![0; len]),
            None => Err(FetchError::Corrupt(format!("no chunk {index}"))),
        }
    }
}

/// The snapshot a lazy mark names, for messages. A mark is written by this
/// daemon, still checked (it goes into a message); one from a daemon that
/// wrote empty marks names none.
fn snapshot_named_by_mark(mark: &str) -> String {
    if hatch_snapshot::names::is_snapshot_id(mark) {
        mark.to_string()
    } else {
        "the snapshot it was woken from".into()
    }
}

impl VmManager {
    pub(crate) fn lazy_paths(&self, id: &str) -> LazyPaths {
        let run = &self.cfg.run_dir;
        let mem = self.paths(id).mem;
        let beside = |ext: &str| {
            let mut name = mem.as_os_str().to_owned();
            name.push(ext);
            PathBuf::from(name)
        };
        LazyPaths {
            mount: run.join(format!("{id}.ram")),
            socket: run.join(format!("{id}.lazyram")),
            spec: run.join(format!("{id}.lazyram.json")),
            pid: run.join(format!("{id}.lazyram.pid")),
            log: run.join(format!("{id}.lazyram.log")),
            marker: beside(".lazy"),
            end_status: beside(".status.json"),
            prefetch: beside(".prefetch.json"),
        }
    }

    /// Whether a wake from S3 serves memory lazily (configured, and S3 is).
    pub(super) fn lazy_memory_enabled(&self) -> bool {
        self.cfg.lazy_memory && self.cfg.s3.is_some()
    }

    /// Start serving `memory` lazily as the VM's RAM; returns the file QEMU
    /// maps. The VM's RAM file becomes the cache the server fills.
    pub(super) async fn serve_ram_lazily(
        &self,
        vm_id: &str,
        snapshot_id: &str,
        memory: &FileChunks,
        first: &[u32],
    ) -> anyhow::Result<PathBuf> {
        let s3 = self.cfg.s3.as_ref().context("no S3 configured")?;
        let lp = self.lazy_paths(vm_id);
        let mem = self.paths(vm_id).mem;
        // Whatever an earlier server left is not this wake's.
        self.end_lazy_ram(vm_id).await?;
        for f in [&mem, &lp.end_status] {
            remove_if_there(f)?;
        }
        std::fs::write(&lp.marker, snapshot_id).context("marking the RAM file lazy")?;
        std::fs::create_dir_all(&lp.mount)
            .with_context(|| format!("creating {}", lp.mount.display()))?;
        let spec = ProcessSpec {
            server: ServerSpec {
                mount_dir: lp.mount.clone(),
                cache_file: mem,
                control_socket: lp.socket.clone(),
                len: memory.len,
                chunk_size: memory.chunk_size,
                chunks: memory.chunks.clone(),
                present: Vec::new(),
                first: first.to_vec(),
                fill_concurrency: FILL_CONCURRENCY,
                fill_pace_ms: self.cfg.lazy_fill_pace.as_millis() as u64,
            },
            s3: S3Spec {
                endpoint: s3.endpoint.clone(),
                bucket: s3.bucket.clone(),
                region: s3.region.clone(),
                access_key_id: s3.access_key_id.clone(),
                secret_access_key: s3.secret_access_key.expose().to_string(),
            },
        };
        spec.server.validate()?;
        write_private(&lp.spec, &serde_json::to_vec(&spec)?)?;
        let exe = std::env::current_exe().context("finding the hatch binary")?;
        let log = std::fs::File::create(&lp.log)
            .with_context(|| format!("creating {}", lp.log.display()))?;
        // A process group of its own: signals to the daemon's group (a
        // terminal's ^C, a test harness) leave the guest's memory alone.
        let mut child = tokio::process::Command::new(exe)
            .arg("lazyram")
            .arg("--spec")
            .arg(&lp.spec)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            // Nothing of the daemon's environment (API key, S3 secret):
            // what it needs is in the spec.
            .env_clear()
            .env("HATCH_LOG", "info")
            .spawn()
            .context("starting the lazy RAM server")?;
        let pid = child.id().context("the lazy RAM server has no pid")?;
        std::fs::write(&lp.pid, pid.to_string()).context("writing the lazy RAM pid file")?;
        let started = Instant::now();
        loop {
            if control::request(&lp.socket, &Request::Status).await.is_ok() {
                break;
            }
            if let Some(exit) = child.try_wait()? {
                let log = std::fs::read_to_string(&lp.log).unwrap_or_default();
                anyhow::bail!(
                    "the lazy RAM server exited ({exit}): {}",
                    log.lines().last().unwrap_or("no output")
                );
            }
            if started.elapsed() > READY_TIMEOUT {
                let _ = child.start_kill();
                anyhow::bail!("the lazy RAM server did not come up in {READY_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Reaped by a task of its own; it outlives this daemon if need be.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        tracing::debug!(vm = %vm_id, pid, ready_ms = started.elapsed().as_millis() as u64,
            "lazy RAM served");
        Ok(lp.mount.join(RAM_FILE))
    }

    /// Tell the VM's server to end once `qemu_pid` exits.
    pub(super) async fn watch_lazy_ram(&self, vm_id: &str, qemu_pid: u32) -> anyhow::Result<()> {
        let lp = self.lazy_paths(vm_id);
        control::request(&lp.socket, &Request::Watch { pid: qemu_pid }).await?;
        Ok(())
    }

    /// Resolves once the VM's lazy RAM server has read a corrupt chunk from
    /// S3, with what it said (naming the chunk); never while none has.
    pub(super) async fn lazy_ram_corruption(&self, vm_id: &str) -> String {
        let lp = self.lazy_paths(vm_id);
        loop {
            if let Ok(r) = control::request(&lp.socket, &Request::Status).await
                && let Some(status) = r.status
                && status.corrupt_seen
            {
                return status
                    .corruption
                    .unwrap_or_else(|| "a memory chunk read from S3 is corrupt".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The snapshot a VM's lazily filled RAM file comes from, if it is one.
    /// `None` for an ordinary RAM file.
    pub(crate) fn lazy_ram_snapshot(&self, vm_id: &str) -> Option<String> {
        let mark = std::fs::read_to_string(self.lazy_paths(vm_id).marker).ok()?;
        Some(snapshot_named_by_mark(&mark))
    }

    /// After a lazy wake, until the memory is all here: a corrupt chunk
    /// found by the background fill is said in the VM's state reason (the
    /// guest waits if it ever reads that chunk; suspends fail saying why;
    /// an older snapshot can be restored).
    pub(crate) fn watch_lazy_fill(
        self: &Arc<Self>,
        rt: Arc<crate::supervisor::VmSupervisor>,
        snapshot_id: String,
    ) {
        let this = self.clone();
        tokio::spawn(async move {
            let lp = this.lazy_paths(&rt.id);
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Ok(r) = control::request(&lp.socket, &Request::Status).await else {
                    return; // the server ended (the VM was suspended or stopped)
                };
                let Some(status) = r.status else { return };
                if status.corrupt_seen {
                    // Said already (by the daemon that woke it, before a
                    // restart): not again.
                    if let Ok(Some(rec)) = this.store.get_vm(&rt.id).await
                        && rec
                            .vm
                            .state_reason
                            .is_some_and(|r| r.starts_with("snapshot_corrupt"))
                    {
                        return;
                    }
                    let why = status.corruption.unwrap_or_default();
                    let reason = format!(
                        "snapshot_corrupt: the memory of {snapshot_id} read from S3 is corrupt ({why}); the guest waits if it reads that chunk and the vm cannot be suspended; restore an older snapshot"
                    );
                    tracing::error!(vm = %rt.id, %reason);
                    if rt.state() == crate::model::VmState::Running
                        && let Err(e) = this
                            .transition(&rt, crate::model::VmState::Running, Some(reason))
                            .await
                    {
                        tracing::warn!(vm = %rt.id, error = %e, "recording the corrupt memory failed");
                    }
                    return;
                }
                if status.complete {
                    return;
                }
            }
        });
    }

    /// Before a capture pauses the guest: every chunk of its memory here.
    /// The guest runs meanwhile. Fails (leaving it running) if the fill
    /// does not complete within `lazy_fill_timeout`.
    pub(super) async fn await_lazy_ram_complete(&self, vm_id: &str) -> anyhow::Result<()> {
        let lp = self.lazy_paths(vm_id);
        if !lp.marker.exists() {
            return Ok(());
        }
        let started = Instant::now();
        let mut logged = false;
        loop {
            let status = control::request(&lp.socket, &Request::Status)
                .await
                .context("asking the lazy RAM server")?
                .status
                .context("the lazy RAM server sent no status")?;
            if status.complete {
                return Ok(());
            }
            if !std::mem::replace(&mut logged, true) {
                tracing::info!(vm = %vm_id, missing = status.chunks - status.present,
                    chunks = status.chunks, "waiting for the rest of the memory from S3 before pausing");
            }
            if started.elapsed() > self.cfg.lazy_fill_timeout {
                anyhow::bail!(
                    "the vm's memory is not all fetched from S3 yet ({} of {} chunks{}); the vm runs on",
                    status.present,
                    status.chunks,
                    status
                        .corruption
                        .or(status.failing)
                        .map(|f| format!(", fetching fails: {f}"))
                        .unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Under a checkpoint's pause: the guest's writes into the RAM file, so
    /// that a copy of it is the guest's memory.
    pub(super) async fn sync_lazy_ram(&self, vm_id: &str) -> anyhow::Result<()> {
        let lp = self.lazy_paths(vm_id);
        if lp.marker.exists() {
            control::request(&lp.socket, &Request::Sync)
                .await
                .context("syncing the lazily served RAM")?;
        }
        Ok(())
    }

    /// End the VM's lazy RAM server, if one runs (its QEMU has exited or
    /// will not use it): synced, its end status written, unmounted. A
    /// server that does not answer is killed and its mount detached.
    pub(crate) async fn end_lazy_ram(&self, vm_id: &str) -> anyhow::Result<Option<EndStatus>> {
        let lp = self.lazy_paths(vm_id);
        let pid = std::fs::read_to_string(&lp.pid)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .filter(|&p| p > 1 && is_lazyram(p));
        if pid.is_none() && !lp.socket.exists() && !is_mounted(&lp.mount) {
            return Ok(None);
        }
        let stopped =
            tokio::time::timeout(END_TIMEOUT, control::request(&lp.socket, &Request::Stop)).await;
        if !matches!(stopped, Ok(Ok(_))) {
            tracing::warn!(vm = %vm_id, ?stopped, "the lazy RAM server did not stop cleanly; killing it");
        }
        if let Some(pid) = pid {
            let deadline = Instant::now() + Duration::from_secs(5);
            while is_lazyram(pid) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if is_lazyram(pid) {
                // SAFETY: kill(2) with a pid read from our pid file and just
                // checked to be a `hatch lazyram` process; no memory involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if is_mounted(&lp.mount) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&lp.mount)
                .status();
        }
        for f in [&lp.pid, &lp.socket, &lp.spec] {
            let _ = std::fs::remove_file(f);
        }
        let _ = std::fs::remove_dir(&lp.mount);
        let end = std::fs::read(&lp.end_status)
            .ok()
            .and_then(|b| serde_json::from_slice::<EndStatus>(&b).ok());
        Ok(end)
    }

    /// The VM's RAM file may now be taken as its memory image: an ordinary
    /// one, or a lazily filled one whose server ended with every chunk here
    /// and the guest's writes synced into it. Ends the server first.
    /// Returns, for a lazy one, the chunks its guest asked for, in order.
    pub(super) async fn take_lazy_ram(&self, vm_id: &str) -> anyhow::Result<Option<Vec<u32>>> {
        let lp = self.lazy_paths(vm_id);
        let end = self.end_lazy_ram(vm_id).await?;
        if !lp.marker.exists() {
            return Ok(None);
        }
        let touched = match end {
            Some(end) if end.status.complete => end.status.touched,
            Some(end) => anyhow::bail!(
                "the lazily served RAM file lacks {} of {} chunks",
                end.status.chunks - end.status.present,
                end.status.chunks
            ),
            None => {
                anyhow::bail!("the lazily served RAM file was not synced when its server ended")
            }
        };
        remove_if_there(&lp.end_status)?;
        remove_if_there(&lp.marker)?;
        Ok(Some(touched))
    }

    /// The marker and end status go with the RAM file.
    pub(crate) fn remove_lazy_files(&self, vm_id: &str) {
        let lp = self.lazy_paths(vm_id);
        let _ = std::fs::remove_file(&lp.marker);
        let _ = std::fs::remove_file(&lp.end_status);
        let _ = std::fs::remove_file(&lp.prefetch);
    }
}

fn remove_if_there(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// Whether `pid` is a `hatch lazyram` process (a stale pid file may name a
/// pid reused by something else).
fn is_lazyram(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|&b| b == 0).nth(1) == Some(b"lazyram".as_slice()))
}

/// Whether something is mounted on `dir` (a FUSE mount whose server died
/// stays until detached).
fn is_mounted(dir: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = dir.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| m == want)
}

#[cfg(test)]
mod tests {
    use super::snapshot_named_by_mark;

    #[test]
    fn a_lazy_mark_names_its_snapshot_only_when_it_holds_an_id() {
        assert_eq!(
            snapshot_named_by_mark("snap-abcdefghij12"),
            "snap-abcdefghij12"
        );
        // Empty (an older daemon's mark), damaged, or not an id at all.
        for mark in [
            "",
            "snap-",
            "snap-abc\n<b>",
            "../../etc",
            "snap-ABCDEFGHIJ12",
        ] {
            assert_eq!(
                snapshot_named_by_mark(mark),
                "the snapshot it was woken from",
                "{mark:?}"
            );
        }
    }
}
