//! The host side of the guest agent channel: a virtio-serial port backed by
//! a unix socket per VM (see `hatch-guest`'s `agent` and `exec` modules for
//! the guest). One connection carries the clock/RNG sync after a restore
//! ([`sync`]) and any number of exec sessions ([`exec`]), as lines.
//!
//! An [`Agent`] is a cheap handle: clones share the connection, and a task
//! reads the guest's lines and hands each to the request it answers. The
//! guest is not trusted: lines are length-bounded, and a line that answers
//! nothing is dropped.

mod exec;
mod sync;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, LinesCodec};

pub use exec::{ExecEvent, ExecInput, ExecSession, ExecStart};
pub use sync::Synced;

use crate::VmmError;

/// The guest's name for the port.
pub const PORT_NAME: &str = "org.hatch.agent";

/// Longest line read from the guest (exec output comes in 16 KiB chunks,
/// base64-encoded).
const MAX_LINE: usize = 1 << 20;

/// A connection to a VM's agent port. Holding it open also lets the guest
/// agent block on reads instead of polling for a host. The connection
/// closes when the last clone (sessions hold one) is dropped.
#[derive(Clone)]
pub struct Agent {
    shared: Arc<Shared>,
}

struct Shared {
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    table: Arc<Table>,
    next_id: AtomicU64,
    reader: tokio::task::AbortHandle,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Who waits for which answer.
#[derive(Default)]
struct Table {
    inner: Mutex<TableInner>,
}

#[derive(Default)]
struct TableInner {
    syncs: HashMap<u64, oneshot::Sender<sync::Reply>>,
    sessions: HashMap<u64, mpsc::Sender<ExecEvent>>,
    /// The guest closed the channel (the VM stopped or was suspended).
    closed: bool,
}

impl Table {
    fn lock(&self) -> MutexGuard<'_, TableInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Agent {
    pub async fn connect(socket: &Path) -> Result<Agent, VmmError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| VmmError::Io {
                path: socket.to_path_buf(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let table = Arc::new(Table::default());
        let writer = Arc::new(tokio::sync::Mutex::new(w));
        let reader = tokio::spawn(read_lines(r, table.clone(), writer.clone())).abort_handle();
        // Ids start at a random point: a guest's stale sessions of an
        // earlier connection must not be taken for this one's.
        let first = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 & 0xff_ffff_ffff)
            .unwrap_or(1)
            | 1;
        Ok(Agent {
            shared: Arc::new(Shared {
                writer,
                table,
                next_id: AtomicU64::new(first),
                reader,
            }),
        })
    }

    /// Whether the guest's end is gone (a new connection is needed).
    pub fn is_closed(&self) -> bool {
        self.shared.table.lock().closed
    }

    /// Close the connection for every clone (sessions included: their
    /// sends fail from now on). Both directions are shut, so QEMU sees the
    /// hang-up at once (whatever the guest is doing) and tells the guest
    /// its host is gone.
    pub async fn close(&self) {
        self.shared.reader.abort();
        {
            let mut t = self.shared.table.lock();
            t.closed = true;
            t.syncs.clear();
            t.sessions.clear();
        }
        let writer = self.shared.writer.lock().await;
        let stream: &tokio::net::UnixStream = writer.as_ref();
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is valid while `writer` (a half of the
        // stream that owns it) is held; shutdown(2) only changes the
        // socket's state and touches no memory of ours.
        unsafe {
            libc::shutdown(stream.as_raw_fd(), libc::SHUT_RDWR);
        }
    }

    fn next_id(&self) -> u64 {
        self.shared.next_id.fetch_add(1, Ordering::Relaxed)
    }

    async fn send(&self, line: &str) -> Result<(), VmmError> {
        let mut w = self.shared.writer.lock().await;
        w.write_all(line.as_bytes())
            .await
            .map_err(|source| VmmError::Io {
                path: "the guest agent channel".into(),
                source,
            })
    }
}

/// Hand each line the guest sends to whoever waits for it, until the
/// channel closes or the guest breaks the protocol; then everyone waiting
/// learns (their senders drop) and the connection is shut, so that a new
/// one can be made (QEMU's socket serves one client at a time).
async fn read_lines(
    r: OwnedReadHalf,
    table: Arc<Table>,
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
) {
    let mut lines = FramedRead::new(r, LinesCodec::new_with_max_length(MAX_LINE));
    while let Some(line) = lines.next().await {
        let line = match line {
            Ok(line) => line,
            Err(tokio_util::codec::LinesCodecError::MaxLineLengthExceeded) => {
                tracing::warn!("the guest agent sent an overlong line; closing the channel");
                break;
            }
            Err(tokio_util::codec::LinesCodecError::Io(e)) => {
                tracing::debug!(error = %e, "guest agent channel read failed");
                break;
            }
        };
        let line = line.trim_end_matches('\r');
        if let Some((id, reply)) = sync::parse_any_reply(line) {
            let waiter = {
                let mut t = table.lock();
                match id {
                    Some(id) => t.syncs.remove(&id),
                    // A guest that predates request ids answers the oldest.
                    None => {
                        let oldest = t.syncs.keys().min().copied();
                        oldest.and_then(|id| t.syncs.remove(&id))
                    }
                }
            };
            match waiter {
                Some(w) => {
                    let _ = w.send(reply);
                }
                None if exec::is_unsupported(line) => exec::fail_all(&table, line),
                None => {}
            }
            continue;
        }
        if let Some((ch, event)) = exec::parse_event(line) {
            let tx = table.lock().sessions.get(&ch).cloned();
            if let Some(tx) = tx {
                // Backpressure: a slow consumer slows the guest's output.
                let _ = tx.send(event).await;
            }
        }
    }
    {
        let mut t = table.lock();
        t.closed = true;
        t.syncs.clear();
        t.sessions.clear();
    }
    let _ = writer.lock().await.shutdown().await;
}
