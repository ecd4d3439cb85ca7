//! Exec sessions: a command run in the guest (or a file copied in or out),
//! its output streamed back, its input streamed in. The line protocol is
//! described in `hatch-guest`'s `exec` module.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde::Serialize;
use std::collections::BTreeMap;
use tokio::sync::mpsc;

use super::{Agent, Table};
use crate::VmmError;

/// Input bytes per line sent to the guest.
const INPUT_CHUNK: usize = 48 << 10;
/// Events buffered per session before the guest's output waits.
const EVENTS: usize = 64;

/// What a session does.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ExecStart {
    /// Run a command.
    Run {
        cmd: Vec<String>,
        env: BTreeMap<String, String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        cwd: Option<String>,
        /// On a pseudo-terminal (output all on stdout).
        tty: bool,
        rows: u16,
        cols: u16,
    },
    /// Send a file's contents as stdout.
    Read { path: String },
    /// Write the session's input to a file (created or truncated).
    Write { path: String, mode: u32 },
}

/// What the guest reports about a session.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    /// The last event: the exit code (128 + signal when killed) and the
    /// signal that ended the command (0 if none).
    Exit {
        code: i32,
        signal: i32,
    },
    /// The session could not start (no such command, no such file, ...).
    Failed(String),
}

/// A session in progress. Dropping it before its end kills the command.
pub struct ExecSession {
    input: ExecInput,
    events: mpsc::Receiver<ExecEvent>,
    over: bool,
}

/// Sends a session's input; clones may live in another task than the
/// session's output.
#[derive(Clone)]
pub struct ExecInput {
    agent: Agent,
    ch: u64,
}

impl Agent {
    /// Start a session.
    pub async fn exec(&self, start: &ExecStart) -> Result<ExecSession, VmmError> {
        let ch = self.next_id();
        let json = serde_json::to_vec(start)
            .map_err(|e| VmmError::Agent(format!("encoding the request: {e}")))?;
        let (tx, rx) = mpsc::channel(EVENTS);
        {
            let mut t = self.shared.table.lock();
            if t.closed {
                return Err(VmmError::Agent("the guest agent channel is closed".into()));
            }
            t.sessions.insert(ch, tx);
        }
        let session = ExecSession {
            input: ExecInput {
                agent: self.clone(),
                ch,
            },
            events: rx,
            over: false,
        };
        self.send(format!("exec {ch} {}\n", B64.encode(json)))
            .await?;
        Ok(session)
    }
}

impl ExecSession {
    /// The next event; `None` once the session is over, or when the
    /// channel closed before its end (the VM stopped).
    pub async fn next(&mut self) -> Option<ExecEvent> {
        if self.over {
            return None;
        }
        let event = self.events.recv().await;
        if matches!(
            event,
            None | Some(ExecEvent::Exit { .. }) | Some(ExecEvent::Failed(_))
        ) {
            self.over = true;
        }
        event
    }

    pub fn input(&self) -> ExecInput {
        self.input.clone()
    }
}

impl Drop for ExecSession {
    fn drop(&mut self) {
        let input = &self.input;
        input.agent.shared.table.lock().sessions.remove(&input.ch);
        if !self.over
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            // Abandoned (the client went away, a timeout): stop the command.
            let input = input.clone();
            rt.spawn(async move {
                let _ = input.kill(libc::SIGKILL).await;
            });
        }
    }
}

impl ExecInput {
    pub async fn write(&self, data: &[u8]) -> Result<(), VmmError> {
        for chunk in data.chunks(INPUT_CHUNK) {
            self.agent
                .send(format!("in {} {}\n", self.ch, B64.encode(chunk)))
                .await?;
        }
        Ok(())
    }

    /// No more input (the command's stdin closes; a file being written is
    /// synced and the session ends).
    pub async fn eof(&self) -> Result<(), VmmError> {
        self.agent.send(format!("eof {}\n", self.ch)).await
    }

    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), VmmError> {
        self.agent
            .send(format!("resize {} {rows} {cols}\n", self.ch))
            .await
    }

    /// Signal the command's process group.
    pub async fn kill(&self, signal: i32) -> Result<(), VmmError> {
        self.agent
            .send(format!("kill {} {signal}\n", self.ch))
            .await
    }
}

/// `out|err|exit|fail <ch> ...` from the guest.
pub(super) fn parse_event(line: &str) -> Option<(u64, ExecEvent)> {
    let mut words = line.splitn(3, ' ');
    let kind = words.next()?;
    let ch: u64 = words.next()?.parse().ok()?;
    let rest = words.next().unwrap_or("");
    let event = match kind {
        "out" => ExecEvent::Stdout(B64.decode(rest).ok()?.into()),
        "err" => ExecEvent::Stderr(B64.decode(rest).ok()?.into()),
        "exit" => {
            let mut nums = rest.split(' ').map(|n| n.parse::<i32>());
            let code = nums.next()?.ok()?;
            let signal = nums.next().and_then(Result::ok).unwrap_or(0);
            ExecEvent::Exit { code, signal }
        }
        "fail" => ExecEvent::Failed(rest.chars().take(4096).collect()),
        _ => return None,
    };
    Some((ch, event))
}

/// A guest agent that predates exec answers `error unknown command "exec"`.
pub(super) fn is_unsupported(line: &str) -> bool {
    line.starts_with("error unknown command \"exec\"")
}

/// Fail every session: the guest cannot run them.
pub(super) fn fail_all(table: &Table, line: &str) {
    let sessions: Vec<_> = table.lock().sessions.values().cloned().collect();
    let why = format!(
        "the guest agent does not support exec (the image predates it): {}",
        line.chars().take(200).collect::<String>()
    );
    for tx in sessions {
        let _ = tx.try_send(ExecEvent::Failed(why.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_events_parse() {
        assert_eq!(
            parse_event("out 3 aGk="),
            Some((3, ExecEvent::Stdout(Bytes::from_static(b"hi"))))
        );
        assert_eq!(
            parse_event("exit 3 137 9"),
            Some((
                3,
                ExecEvent::Exit {
                    code: 137,
                    signal: 9
                }
            ))
        );
        assert_eq!(
            parse_event("fail 4 sh: not found"),
            Some((4, ExecEvent::Failed("sh: not found".into())))
        );
        assert_eq!(parse_event("out x aGk="), None);
        assert_eq!(parse_event("out 3 !!"), None, "bad base64 is dropped");
        assert_eq!(parse_event("exit 3 x"), None);
        assert_eq!(parse_event("ok 3 1.0"), None);
        let json = serde_json::to_string(&ExecStart::Write {
            path: "/a".into(),
            mode: 0o600,
        })
        .unwrap();
        assert_eq!(json, r#"{"op":"write","path":"/a","mode":384}"#);
    }
}
