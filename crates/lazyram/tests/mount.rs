//! The server through a real FUSE mount, used the way QEMU uses it: the
//! file mapped shared, read and written through the mapping. Needs
//! /dev/fuse and the right to mount (root, or fusermount3).
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use hatch_lazyram::control::{Request, request};
use hatch_lazyram::{ChunkSource, FetchError, RAM_FILE, Server, ServerSpec};

const CHUNK: u64 = 1 << 20;
const CHUNKS: usize = 8;

struct Source {
    down: AtomicBool,
    fetches: AtomicUsize,
}

#[async_trait::async_trait]
impl ChunkSource for Source {
    async fn fetch(&self, i: usize) -> Result<Vec<u8>, FetchError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(FetchError::Unavailable("S3 unreachable".into()));
        }
        self.fetches.fetch_add(1, Ordering::SeqCst);
        // Every 8-byte word holds its own offset: any misplaced byte shows.
        let start = i as u64 * CHUNK;
        Ok((0..CHUNK / 8)
            .flat_map(|w| (start + w * 8).to_le_bytes())
            .collect())
    }
}

fn word_at(off: u64) -> [u8; 8] {
    (off & !7).to_le_bytes()
}

struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    /// Map `path` shared and writable, as QEMU's memory-backend-file with
    /// share=on does.
    fn shared(path: &Path, len: usize) -> (std::fs::File, Mapping) {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh mapping of an open file; checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        (
            f,
            Mapping {
                ptr: ptr.cast(),
                len,
            },
        )
    }
    fn read(&self, off: usize) -> [u8; 8] {
        assert!(off + 8 <= self.len);
        // SAFETY: in bounds of a live mapping.
        unsafe { std::ptr::read_volatile(self.ptr.add(off).cast::<[u8; 8]>()) }
    }
    fn write(&self, off: usize, v: [u8; 8]) {
        assert!(off + 8 <= self.len);
        // SAFETY: in bounds of a live, writable mapping.
        unsafe { std::ptr::write_volatile(self.ptr.add(off).cast::<[u8; 8]>(), v) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what mmap returned.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

async fn wait_for_socket(path: &Path) {
    for _ in 0..500 {
        if request(path, &Request::Status).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the server never answered on {}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mapped_lazy_file_reads_right_survives_an_outage_and_tracks_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("mnt");
    std::fs::create_dir(&mount).unwrap();
    let mut chunks: Vec<Option<String>> = (0..CHUNKS).map(|i| Some(format!("c{i}"))).collect();
    chunks[6] = None; // an all-zero chunk
    let spec = ServerSpec {
        mount_dir: mount.clone(),
        cache_file: dir.path().join("cache"),
        control_socket: dir.path().join("ctl.sock"),
        len: CHUNKS as u64 * CHUNK,
        chunk_size: CHUNK,
        chunks,
        present: Vec::new(),
        first: vec![5],
        // The fill is held off by the outage below long enough to see
        // demand fetches; with 1 at a time it is slow enough to not race.
        fill_pace_ms: 0,
        fill_concurrency: 1,
    };
    let source = Arc::new(Source {
        down: AtomicBool::new(true),
        fetches: AtomicUsize::new(0),
    });
    let server = tokio::spawn(Server::run(spec.clone(), source.clone()));
    wait_for_socket(&spec.control_socket).await;

    let (_f, map) = Mapping::shared(&mount.join(RAM_FILE), (CHUNKS as u64 * CHUNK) as usize);
    // S3 is down: a read through the mapping waits (no SIGBUS), and the
    // status says why.
    let reader = {
        let ptr = map.ptr as usize;
        std::thread::spawn(move || {
            // SAFETY: the mapping outlives this thread (joined below).
            unsafe { std::ptr::read_volatile((ptr + 3 * CHUNK as usize + 4096) as *const [u8; 8]) }
        })
    };
    let mut failing = None;
    for _ in 0..200 {
        let s = request(&spec.control_socket, &Request::Status)
            .await
            .unwrap()
            .status
            .unwrap();
        if s.failing.is_some() {
            failing = s.failing;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(failing.unwrap().contains("S3 unreachable"));
    assert!(!reader.is_finished());
    source.down.store(false, Ordering::SeqCst);
    assert_eq!(reader.join().unwrap(), word_at(3 * CHUNK + 4096));

    // Every word is where it belongs, zeros in the zero chunk.
    for off in (0..CHUNKS as u64 * CHUNK).step_by(256 << 10) {
        let want = if off / CHUNK == 6 {
            [0; 8]
        } else {
            word_at(off)
        };
        assert_eq!(map.read(off as usize), want, "at {off}");
    }
    // A write through the mapping comes back as a dirty chunk in the
    // cache file once synced.
    map.write((2 * CHUNK + 8) as usize, *b"written!");
    let s = request(&spec.control_socket, &Request::Sync)
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(s.dirty, vec![2]);
    // The first demand was around the first fault (the kernel reads
    // around a faulting address, so a neighbour may come first).
    assert!(s.touched[..2].contains(&3), "{:?}", s.touched);
    let mut got = [0u8; 8];
    std::fs::File::open(&spec.cache_file)
        .unwrap()
        .read_exact_at(&mut got, 2 * CHUNK + 8)
        .unwrap();
    assert_eq!(&got, b"written!");

    drop(map);
    drop(_f);
    let end = {
        request(&spec.control_socket, &Request::Stop).await.unwrap();
        server.await.unwrap().unwrap()
    };
    assert_eq!(end.status.dirty, vec![2]);
    let recorded: serde_json::Value =
        serde_json::from_slice(&std::fs::read(spec.end_status_file()).unwrap()).unwrap();
    assert_eq!(recorded["status"]["dirty"], serde_json::json!([2]));
    // Unmounted: the directory is empty again.
    assert!(!mount.join(RAM_FILE).exists());
    // Fetched at most once per stored chunk (7), demand and fill together.
    assert!(source.fetches.load(Ordering::SeqCst) <= 7);
}
