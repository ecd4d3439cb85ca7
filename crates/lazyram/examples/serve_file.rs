//! Probe: serve an existing RAM image lazily, as if from S3, with a fixed
//! delay per chunk fetch. `serve_file SRC MOUNT_DIR CACHE SOCKET DELAY_MS`.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use hatch_lazyram::{ChunkSource, FetchError, Server, ServerSpec};

const CHUNK: u64 = 1 << 20;

struct FileSource {
    file: std::fs::File,
    len: u64,
    delay: Duration,
}

#[async_trait::async_trait]
impl ChunkSource for FileSource {
    async fn fetch(&self, i: usize) -> Result<Vec<u8>, FetchError> {
        tokio::time::sleep(self.delay).await;
        let start = i as u64 * CHUNK;
        let mut buf = vec![0u8; (CHUNK.min(self.len - start)) as usize];
        self.file
            .read_exact_at(&mut buf, start)
            .map_err(|e| FetchError::Unavailable(e.to_string()))?;
        Ok(buf)
    }
}

#[tokio::main]
async fn main() {
    let a: Vec<String> = std::env::args().collect();
    let file = std::fs::File::open(&a[1]).unwrap();
    let len = file.metadata().unwrap().len();
    let mut chunks = Vec::new();
    let mut buf = vec![0u8; CHUNK as usize];
    for i in 0..len.div_ceil(CHUNK) {
        let n = CHUNK.min(len - i * CHUNK) as usize;
        file.read_exact_at(&mut buf[..n], i * CHUNK).unwrap();
        chunks.push(if buf[..n].iter().all(|&b| b == 0) {
            None
        } else {
            Some(format!("c{i}"))
        });
    }
    let stored = chunks.iter().flatten().count();
    eprintln!("{} chunks, {stored} stored", chunks.len());
    let spec = ServerSpec {
        mount_dir: a[2].clone().into(),
        cache_file: a[3].clone().into(),
        control_socket: a[4].clone().into(),
        len,
        chunk_size: CHUNK,
        chunks,
        present: Vec::new(),
        first: Vec::new(),
        fill_pace_ms: 0,
        fill_concurrency: std::env::var("FILL")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4),
    };
    let delay = Duration::from_millis(a[5].parse().unwrap());
    let end = Server::run(spec, Arc::new(FileSource { file, len, delay }))
        .await
        .unwrap();
    eprintln!(
        "ended: present {} dirty {:?} touched {}",
        end.status.present,
        end.status.dirty.len(),
        end.status.touched.len()
    );
}
