use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, oneshot, watch};

use crate::commands::Command;
use crate::error::QmpError;

/// An asynchronous QMP event, e.g. `STOP`, `RESUME`, `SHUTDOWN`.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    pub event: String,
    #[serde(default)]
    pub data: Value,
}

type Reply = Result<Value, (String, String)>;
// A std Mutex: it is held only to insert or remove one entry, never across an await.
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>;

/// How long a command may take by default before [`QmpError::Timeout`].
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected, capability-negotiated QMP session.
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    /// Per-command timeout in milliseconds (every command has one: a QEMU
    /// that hangs must not hang its caller).
    timeout_ms: AtomicU64,
    events: broadcast::Sender<Event>,
    closed: watch::Receiver<bool>,
}

impl Qmp {
    /// Connect to a QMP unix socket, read the greeting and leave negotiation mode.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (read, write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut greeting = String::new();
        if reader.read_line(&mut greeting).await? == 0 {
            return Err(QmpError::Disconnected);
        }
        let greeting: Value = serde_json::from_str(&greeting)
            .map_err(|e| QmpError::Handshake(format!("bad greeting: {e}")))?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Handshake(format!(
                "not a QMP greeting: {greeting}"
            )));
        }

        let pending: Pending = Arc::default();
        let (events, _) = broadcast::channel(64);
        let (closed_tx, closed) = watch::channel(false);
        tokio::spawn(read_loop(
            reader,
            pending.clone(),
            events.clone(),
            closed_tx,
        ));

        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(write),
            pending,
            next_id: AtomicU64::new(1),
            timeout_ms: AtomicU64::new(DEFAULT_COMMAND_TIMEOUT.as_millis() as u64),
            events,
            closed,
        };
        qmp.execute_raw("qmp_capabilities", None)
            .await
            .map_err(|e| QmpError::Handshake(e.to_string()))?;
        Ok(qmp)
    }

    /// Set how long each command may take.
    pub fn set_timeout(&self, timeout: Duration) {
        self.timeout_ms
            .store(timeout.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    /// Run a typed command and decode its answer.
    pub async fn execute<C: Command>(&self, command: &C) -> Result<C::Response, QmpError> {
        let args = serde_json::to_value(command).map_err(|source| QmpError::Decode {
            command: C::NAME,
            source,
        })?;
        // Unit structs serialize to null; QMP wants no `arguments` then.
        let args = (!args.is_null()).then_some(args);
        let value = self.execute_raw(C::NAME, args).await?;
        serde_json::from_value(value).map_err(|source| QmpError::Decode {
            command: C::NAME,
            source,
        })
    }

    /// Run a command by name with raw JSON arguments.
    pub async fn execute_raw(
        &self,
        command: &'static str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        if *self.closed.borrow() {
            lock(&self.pending).remove(&id);
            return Err(QmpError::Disconnected);
        }
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let exchange = async {
            {
                let mut writer = self.writer.lock().await;
                writer.write_all(line.as_bytes()).await?;
            }
            match rx.await {
                Ok(Ok(value)) => Ok(value),
                Ok(Err((class, desc))) => Err(QmpError::Command {
                    command,
                    class,
                    desc,
                }),
                Err(_) => Err(QmpError::Disconnected),
            }
        };
        let after = self.timeout();
        let result = match tokio::time::timeout(after, exchange).await {
            Ok(result) => result,
            Err(_) => Err(QmpError::Timeout { command, after }),
        };
        if result.is_err() {
            lock(&self.pending).remove(&id);
        }
        result
    }

    /// Subscribe to asynchronous events from now on.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Resolves once the connection has ended (normally: QEMU exited).
    pub async fn closed(&self) {
        let mut closed = self.closed.clone();
        // An error means the reader task is gone, which also means closed.
        let _ = closed.wait_for(|c| *c).await;
    }

    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the map inconsistent.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Deserialize)]
struct Message {
    #[serde(rename = "return")]
    ret: Option<Value>,
    error: Option<ErrorBody>,
    id: Option<u64>,
    event: Option<String>,
    #[serde(default)]
    data: Value,
}

#[derive(Deserialize)]
struct ErrorBody {
    class: String,
    desc: String,
}

async fn read_loop(
    mut reader: BufReader<OwnedReadHalf>,
    pending: Pending,
    events: broadcast::Sender<Event>,
    closed: watch::Sender<bool>,
) {
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "QMP read failed");
                break;
            }
        }
        let msg: Message = match serde_json::from_str(&line) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, line = line.trim(), "undecodable QMP message");
                continue;
            }
        };
        if let Some(event) = msg.event {
            // No subscribers is fine: events are advisory.
            let _ = events.send(Event {
                event,
                data: msg.data,
            });
            continue;
        }
        let Some(id) = msg.id else {
            tracing::warn!(line = line.trim(), "QMP answer without id");
            continue;
        };
        let Some(waiter) = lock(&pending).remove(&id) else {
            continue;
        };
        let reply = match (msg.ret, msg.error) {
            (_, Some(e)) => Err((e.class, e.desc)),
            (Some(v), None) => Ok(v),
            (None, None) => Ok(Value::Null),
        };
        let _ = waiter.send(reply);
    }
    let _ = closed.send(true);
    // Dropping the senders wakes every waiter with Disconnected.
    lock(&pending).clear();
}
