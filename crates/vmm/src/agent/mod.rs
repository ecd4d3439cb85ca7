//! The host side of the guest agent channel: a virtio-serial port backed by
//! a unix socket per VM (see `hatch-guest`'s `agent` and `exec` modules for
//! the guest). One connection carries the clock/RNG sync after a restore
//! ([`sync`]) and any number of exec sessions ([`exec`]), as lines.
//!
//! An [`Agent`] is a cheap handle: clones share the connection, and a task
//! reads the guest's lines and hands each to the request it answers. The
//! guest is not trusted: lines are length-bounded, and a line that answers
//! nothing is dropped.
//!
//! Lines to the guest go through a queue to one writer task, never written
//! by the caller itself: a caller cancelled in the middle of a write (a
//! timeout, an aborted input feeder) would leave half a line on the wire,
//! and the next line, glued to it, would be lost to the guest. That is how
//! a kill once missed its command (docs/PERFORMANCE.md, "Seen once").
//! Queueing a whole line is all-or-nothing, whoever is cancelled.

mod exec;
mod sync;

use std::collections::HashMap;
use std::net::Shutdown;
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

/// Lines queued for the guest before senders wait (input lines are up to
/// 64 KiB: at most 1 MiB held per VM).
const QUEUED_LINES: usize = 16;

/// A connection to a VM's agent port. Holding it open also lets the guest
/// agent block on reads instead of polling for a host. The connection
/// closes when the last clone (sessions hold one) is dropped.
#[derive(Clone)]
pub struct Agent {
    shared: Arc<Shared>,
}

struct Shared {
    /// To the writer task, whole lines only.
    lines: mpsc::Sender<String>,
    /// A second handle on the connection, to shut it down whatever the
    /// tasks are doing.
    socket: Arc<std::os::unix::net::UnixStream>,
    table: Arc<Table>,
    next_id: AtomicU64,
    reader: tokio::task::AbortHandle,
}

impl Drop for Shared {
    // The writer is left to drain: the last clone's final lines (a kill
    // sent as a session is dropped) still reach the guest. It ends when
    // its queue is empty, or when a write fails. (One stuck on a guest
    // that reads nothing ends with its QEMU; every handle is dropped today
    // after QEMU quit or after `close`, which shuts the socket.)
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
        let io = |source| VmmError::Io {
            path: socket.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(socket).await.map_err(io)?;
        let std = stream.into_std().map_err(io)?;
        let shut = Arc::new(std.try_clone().map_err(io)?);
        let (r, w) = UnixStream::from_std(std).map_err(io)?.into_split();
        let table = Arc::new(Table::default());
        let (lines, queued) = mpsc::channel(QUEUED_LINES);
        tokio::spawn(write_lines(w, queued, table.clone(), shut.clone()));
        let reader = tokio::spawn(read_lines(r, table.clone(), shut.clone())).abort_handle();
        // Ids start at a random point: a guest's stale sessions of an
        // earlier connection must not be taken for this one's.
        let first = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 & 0xff_ffff_ffff)
            .unwrap_or(1)
            | 1;
        Ok(Agent {
            shared: Arc::new(Shared {
                lines,
                socket: shut,
                table,
                next_id: AtomicU64::new(first),
                reader,
            }),
        })
    }

    /// Whether the guest's end is gone (a new connection is needed).
    pub fn is_closed(&self) -> bool {
        self.shared.table.lock().closed || self.shared.lines.is_closed()
    }

    /// Close the connection for every clone (sessions included: their
    /// sends fail from now on). Both directions are shut, so QEMU sees the
    /// hang-up at once (whatever the guest is doing) and tells the guest
    /// its host is gone. Lines still queued are dropped: nothing reaches
    /// the guest after this returns.
    pub fn close(&self) {
        self.shared.reader.abort();
        hang_up(&self.shared.table, &self.shared.socket);
    }

    fn next_id(&self) -> u64 {
        self.shared.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Queue one whole line (ending in a newline) for the guest. Cancelled
    /// while waiting for room, it queued nothing.
    async fn send(&self, line: String) -> Result<(), VmmError> {
        let closed = || VmmError::Io {
            path: "the guest agent channel".into(),
            source: std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the guest agent channel is closed",
            ),
        };
        if self.shared.table.lock().closed {
            return Err(closed());
        }
        self.shared.lines.send(line).await.map_err(|_| closed())
    }
}

/// The connection is over: everyone waiting learns (their senders drop),
/// and the socket is shut so that QEMU sees the hang-up at once and a new
/// connection can be made (QEMU's socket serves one client at a time).
fn hang_up(table: &Table, socket: &std::os::unix::net::UnixStream) {
    {
        let mut t = table.lock();
        t.closed = true;
        t.syncs.clear();
        t.sessions.clear();
    }
    let _ = socket.shutdown(Shutdown::Both);
}

/// Write the queued lines in order, each whole, until every sender is gone
/// or the connection breaks.
async fn write_lines(
    mut w: OwnedWriteHalf,
    mut lines: mpsc::Receiver<String>,
    table: Arc<Table>,
    socket: Arc<std::os::unix::net::UnixStream>,
) {
    while let Some(line) = lines.recv().await {
        if let Err(e) = w.write_all(line.as_bytes()).await {
            tracing::debug!(error = %e, "guest agent channel write failed");
            hang_up(&table, &socket);
            return;
        }
    }
}

/// Hand each line the guest sends to whoever waits for it, until the
/// channel closes or the guest breaks the protocol; then the connection
/// hangs up.
async fn read_lines(
    r: OwnedReadHalf,
    table: Arc<Table>,
    socket: Arc<std::os::unix::net::UnixStream>,
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
    hang_up(&table, &socket);
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

    /// Input feeders cancelled while they write, each followed by a kill:
    /// every line the guest reads is whole, the kill one of them. (Written
    /// by the caller, a feeder cancelled in the middle of a line left half
    /// of it, and the kill glued to it was lost.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn senders_cancelled_mid_line_leave_no_half_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let agent = Agent::connect(&path).await.unwrap();
        let (guest, _) = listener.accept().await.unwrap();
        let mut guest = BufReader::new(guest);

        // Where a feeder is when it is cancelled varies with the round.
        for round in 0..8 {
            let session = agent
                .exec(&ExecStart::Write {
                    path: "/f".into(),
                    mode: 0o600,
                })
                .await
                .unwrap();
            let mut first = String::new();
            guest.read_line(&mut first).await.unwrap();
            let ch: u64 = first.split(' ').nth(1).unwrap().parse().unwrap();
            let input = session.input();
            let feeder = tokio::spawn({
                let input = input.clone();
                async move { input.write(&vec![b'x'; 64 << 20]).await }
            });
            // The guest reads while the feeder writes, then the feeder is
            // cancelled wherever it is.
            let mut seen = vec![0u8; (300 << 10) + round * 12_345];
            guest.read_exact(&mut seen).await.unwrap();
            feeder.abort();
            assert!(feeder.await.unwrap_err().is_cancelled());
            // Queued behind what the guest has not read yet.
            let killing = tokio::spawn(async move { input.kill(9).await });

            let kill = format!("kill {ch} 9\n");
            while !seen.ends_with(kill.as_bytes()) {
                let n = guest.read_until(b'\n', &mut seen).await.unwrap();
                assert_ne!(n, 0, "the channel closed before the kill");
            }
            killing.await.unwrap().unwrap();
            // Its drop kills the command too: read that before the next
            // round's lines.
            drop(session);
            let mut line = String::new();
            while line != kill {
                line.clear();
                guest.read_line(&mut line).await.unwrap();
            }
            let text = String::from_utf8(seen).unwrap();
            let lines: Vec<&str> = text.trim_end_matches('\n').split('\n').collect();
            let (last, inputs) = lines.split_last().unwrap();
            assert_eq!(format!("{last}\n"), kill);
            for line in inputs {
                let data = line
                    .strip_prefix(&format!("in {ch} "))
                    .unwrap_or_else(|| panic!("round {round}: not an input line: {line:.80}"));
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .unwrap_or_else(|e| {
                        let tail = &line[line.len().saturating_sub(40)..];
                        panic!("round {round}: a damaged input line ({e}): ...{tail}")
                    });
                assert!(bytes.iter().all(|&b| b == b'x'));
            }
        }
    }
}
