//! Getting into a VM: run a command (`POST /vms/{id}/exec`, answered when
//! it ends), run one with live output and input (`GET /vms/{id}/exec/ws`,
//! a WebSocket), and copy files (`GET|PUT /vms/{id}/files?path=`).
//!
//! WebSocket protocol: the client's first message is a text JSON
//! [`StreamRequest`]; then the client sends binary messages `0x00 DATA`
//! (stdin) and text JSON controls `{"eof": true}`, `{"resize": [rows,
//! cols]}`, `{"signal": N}`; the server sends binary `0x01 DATA` (stdout)
//! and `0x02 DATA` (stderr), and last a text JSON `{"exit_code": N,
//! "signal": N|null}` or `{"error": {"code", "message"}}`, then closes.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use hatch_vmm::agent::{ExecEvent, ExecStart};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{ApiJson, App};
use crate::error::ApiError;

/// Output kept per stream by `POST /exec`; more is dropped (`truncated`).
const MAX_OUTPUT: usize = 4 << 20;
const DEFAULT_TIMEOUT: u64 = 60;
const MAX_TIMEOUT: u64 = 3600;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The program and its arguments.
    cmd: Vec<String>,
    /// Added to the environment (an imported image's own comes first).
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Given to the command as its standard input (then closed).
    #[serde(default)]
    stdin: Option<String>,
    /// The command is killed after this long (default 60, at most 3600).
    #[serde(default)]
    timeout_seconds: Option<u64>,
    /// Working directory (default: the image's).
    #[serde(default)]
    cwd: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ExecResult {
    /// The command's exit code (128 + N when signal N ended it); null when
    /// it was killed for its timeout.
    exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    signal: Option<i32>,
    stdout: String,
    stderr: String,
    timed_out: bool,
    /// Output beyond 4 MiB per stream was dropped.
    truncated: bool,
}

/// Checks shared by both exec forms.
fn validate(
    cmd: &[String],
    env: &BTreeMap<String, String>,
    cwd: Option<&str>,
) -> Result<(), ApiError> {
    if cmd.is_empty() || cmd[0].is_empty() {
        return Err(ApiError::invalid("cmd must name a program"));
    }
    let size: usize = cmd.iter().map(String::len).sum::<usize>()
        + env.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
    if cmd.len() > 4096 || size > 256 << 10 {
        return Err(ApiError::invalid(
            "cmd and env are too large (at most 4096 arguments and 256 KiB)",
        ));
    }
    if cmd.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::invalid("cmd holds a NUL byte"));
    }
    crate::model::validate_env(env)?;
    if let Some(cwd) = cwd
        && (!cwd.starts_with('/') || cwd.contains('\0'))
    {
        return Err(ApiError::invalid("cwd must be an absolute path"));
    }
    Ok(())
}

#[utoipa::path(post, path = "/vms/{id}/exec", operation_id = "execVm", tag = "vms",
    request_body = ExecRequest,
    responses((status = 200, body = ExecResult), (status = 404), (status = 409, description = "the VM is stopped"),
        (status = 422, description = "bad request, or the command could not start"), (status = 503)))]
pub async fn exec(
    State(app): App,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> Result<Json<ExecResult>, ApiError> {
    validate(&req.cmd, &req.env, req.cwd.as_deref())?;
    let timeout = req.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT);
    if !(1..=MAX_TIMEOUT).contains(&timeout) {
        return Err(ApiError::invalid(format!(
            "timeout_seconds must be 1 to {MAX_TIMEOUT}"
        )));
    }
    let start = ExecStart::Run {
        cmd: req.cmd,
        env: req.env,
        cwd: req.cwd,
        tty: false,
        rows: 0,
        cols: 0,
    };
    let mut exec = crate::exec::open(&app.vms, &id, start).await?;
    let input = exec.session.input();
    let stdin = req.stdin.unwrap_or_default();
    // Fed while the output is read: a command that writes before it has
    // read all its input must not wait on us.
    let feed = tokio::spawn(async move {
        input.write(stdin.as_bytes()).await?;
        input.eof().await
    });
    let _feed_guard = AbortOnDrop(feed.abort_handle());
    let mut out = ExecResult {
        exit_code: None,
        signal: None,
        stdout: String::new(),
        stderr: String::new(),
        timed_out: false,
        truncated: false,
    };
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let collect = async {
        loop {
            match exec.session.next().await {
                Some(ExecEvent::Stdout(b)) => out.truncated |= keep(&mut stdout, &b),
                Some(ExecEvent::Stderr(b)) => out.truncated |= keep(&mut stderr, &b),
                Some(ExecEvent::Exit { code, signal }) => {
                    out.exit_code = Some(code);
                    out.signal = (signal != 0).then_some(signal);
                    return Ok(());
                }
                Some(ExecEvent::Failed(why)) => {
                    return Err(ApiError::invalid(format!("cannot run the command: {why}")));
                }
                None => return Err(vm_went_away()),
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(timeout), collect).await {
        Ok(result) => result?,
        Err(_) => {
            // Dropping the session kills the command's process group.
            out.timed_out = true;
            out.signal = Some(libc::SIGKILL);
        }
    }
    out.stdout = String::from_utf8_lossy(&stdout).into_owned();
    out.stderr = String::from_utf8_lossy(&stderr).into_owned();
    Ok(Json(out))
}

/// Aborts a task when dropped (the request ended first).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Append within the cap; true if something was dropped.
fn keep(buf: &mut Vec<u8>, data: &[u8]) -> bool {
    let room = MAX_OUTPUT.saturating_sub(buf.len());
    buf.extend_from_slice(&data[..data.len().min(room)]);
    data.len() > room
}

fn vm_went_away() -> ApiError {
    ApiError::Unavailable(
        "vm_unavailable",
        "the VM stopped or was suspended before the command ended".into(),
    )
}

/// The first message of an exec WebSocket.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamRequest {
    cmd: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    cwd: Option<String>,
    /// Run on a pseudo-terminal (interactive shells; output all on stdout).
    #[serde(default)]
    tty: bool,
    #[serde(default)]
    rows: u16,
    #[serde(default)]
    cols: u16,
}

/// A control message from the client (and, internally, its stdin).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Control {
    #[serde(skip)]
    data: Option<Vec<u8>>,
    #[serde(default)]
    eof: bool,
    #[serde(default)]
    resize: Option<(u16, u16)>,
    #[serde(default)]
    signal: Option<i32>,
}

#[utoipa::path(get, path = "/vms/{id}/exec/ws", operation_id = "execVmStream", tag = "vms",
    responses((status = 101, description = "WebSocket: see the module documentation"), (status = 404)))]
pub async fn exec_ws(
    State(app): App,
    Path(id): Path<String>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    // An unknown VM is a 404 before the upgrade.
    let id = app.vms.resolve_local(&id).await?;
    Ok(ws.on_upgrade(move |socket| async move {
        let mut socket = socket;
        if let Err(e) = stream(&app, &id, &mut socket).await {
            let body = json!({"error": {"code": e.code(), "message": e.to_string()}});
            let _ = socket.send(Message::Text(body.to_string().into())).await;
        }
        // Close gracefully: read what the client still sends until its
        // Close, so that unread input does not reset the connection before
        // the client has read the end message.
        let _ = socket.send(Message::Close(None)).await;
        let drain = async {
            while let Some(Ok(m)) = socket.recv().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    }))
}

async fn stream(app: &super::AppState, id: &str, socket: &mut WebSocket) -> Result<(), ApiError> {
    let req: StreamRequest = match socket.recv().await {
        Some(Ok(Message::Text(t))) => serde_json::from_str(&t)
            .map_err(|e| ApiError::BadRequest(format!("bad exec request: {e}")))?,
        _ => {
            return Err(ApiError::BadRequest(
                "the first message must be the exec request (JSON text)".into(),
            ));
        }
    };
    validate(&req.cmd, &req.env, req.cwd.as_deref())?;
    let start = ExecStart::Run {
        cmd: req.cmd,
        env: req.env,
        cwd: req.cwd,
        tty: req.tty,
        rows: req.rows,
        cols: req.cols,
    };
    let mut exec = crate::exec::open(&app.vms, id, start).await?;
    let input = exec.session.input();
    // The client's input goes to the guest from a task of its own, so that
    // output keeps flowing while input waits on a command that does not read.
    let (to_guest, mut queued) = tokio::sync::mpsc::channel::<Control>(64);
    let feeder = tokio::spawn(async move {
        while let Some(c) = queued.recv().await {
            let sent = async {
                if let Some(data) = &c.data {
                    input.write(data).await?;
                }
                if let Some((rows, cols)) = c.resize {
                    input.resize(rows, cols).await?;
                }
                if let Some(sig) = c.signal {
                    input.kill(sig).await?;
                }
                if c.eof {
                    input.eof().await?;
                }
                Ok::<(), hatch_vmm::VmmError>(())
            };
            if sent.await.is_err() {
                return;
            }
        }
    });
    let _feeder = AbortOnDrop(feeder.abort_handle());
    let queue = |c: Control| {
        let to_guest = to_guest.clone();
        async move {
            to_guest.send(c).await.map_err(|_| {
                ApiError::Unavailable("agent_unavailable", "the guest agent channel closed".into())
            })
        }
    };
    loop {
        tokio::select! {
            event = exec.session.next() => {
                let msg = match event {
                    Some(ExecEvent::Stdout(b)) => tagged(1, &b),
                    Some(ExecEvent::Stderr(b)) => tagged(2, &b),
                    Some(ExecEvent::Exit { code, signal }) => {
                        let end = json!({"exit_code": code, "signal": (signal != 0).then_some(signal)});
                        let _ = socket.send(Message::Text(end.to_string().into())).await;
                        return Ok(());
                    }
                    Some(ExecEvent::Failed(why)) => {
                        return Err(ApiError::invalid(format!("cannot run the command: {why}")));
                    }
                    None => return Err(vm_went_away()),
                };
                if socket.send(msg).await.is_err() {
                    return Ok(()); // the client left: the session's drop kills the command
                }
            }
            msg = socket.recv() => match msg {
                Some(Ok(Message::Binary(b))) if b.first() == Some(&0) => {
                    queue(Control { data: Some(b[1..].to_vec()), ..Control::default() }).await?;
                }
                Some(Ok(Message::Text(t))) => {
                    let c: Control = serde_json::from_str(&t)
                        .map_err(|e| ApiError::BadRequest(format!("bad control message: {e}")))?;
                    if c.signal.is_some_and(|sig| !(1..=64).contains(&sig)) {
                        return Err(ApiError::invalid("signal must be 1 to 64"));
                    }
                    queue(c).await?;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Binary(_))) => {
                    return Err(ApiError::BadRequest("binary messages start with 0x00 (stdin)".into()));
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return Ok(()),
            }
        }
    }
}

fn tagged(tag: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(tag);
    v.extend_from_slice(data);
    Message::Binary(v.into())
}

#[derive(Debug, Deserialize)]
pub struct FileQuery {
    /// Absolute path in the VM (inside an imported image's root).
    path: String,
    /// Permission bits of a written file, octal (default 644).
    #[serde(default)]
    mode: Option<String>,
}

fn file_path(q: &FileQuery) -> Result<String, ApiError> {
    if !q.path.starts_with('/') || q.path.contains('\0') || q.path.len() > 4096 {
        return Err(ApiError::invalid("path must be an absolute path in the VM"));
    }
    Ok(q.path.clone())
}

/// A session that could not start: a missing file is a 404.
fn file_error(path: &str, why: String) -> ApiError {
    if why.contains("No such file") || why.contains("os error 2)") {
        ApiError::NotFound(format!("no file '{path}' in the VM"))
    } else {
        ApiError::invalid(format!("'{path}': {why}"))
    }
}

#[utoipa::path(get, path = "/vms/{id}/files", operation_id = "readVmFile", tag = "vms",
    params(("path" = String, Query, description = "absolute path in the VM")),
    responses((status = 200, description = "the file's bytes"), (status = 404), (status = 409), (status = 503)))]
pub async fn read_file(
    State(app): App,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> Result<Response, ApiError> {
    let path = file_path(&q)?;
    let start = ExecStart::Read { path: path.clone() };
    let mut exec = crate::exec::open(&app.vms, &id, start).await?;
    // The first event tells whether the file opened.
    let first = match exec.session.next().await {
        Some(ExecEvent::Failed(why)) => return Err(file_error(&path, why)),
        Some(ExecEvent::Stdout(b)) => Some(b),
        Some(ExecEvent::Exit { .. }) => None,
        Some(ExecEvent::Stderr(b)) => {
            return Err(ApiError::invalid(format!(
                "'{path}': {}",
                String::from_utf8_lossy(&b).trim()
            )));
        }
        None => return Err(vm_went_away()),
    };
    let Some(first) = first else {
        return Ok((StatusCode::OK, Body::empty()).into_response());
    };
    let rest = futures_util::stream::unfold(exec, |mut exec| async move {
        match exec.session.next().await {
            Some(ExecEvent::Stdout(b)) => Some((Ok::<Bytes, std::io::Error>(b), exec)),
            Some(ExecEvent::Exit { code: 0, .. }) => None,
            Some(ExecEvent::Stderr(b)) => Some((
                Err(std::io::Error::other(
                    String::from_utf8_lossy(&b).into_owned(),
                )),
                exec,
            )),
            // A read that broke off must not look complete.
            _ => Some((Err(std::io::Error::other("the copy broke off")), exec)),
        }
    });
    let body = futures_util::stream::once(async move { Ok(first) }).chain(rest);
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(body),
    )
        .into_response())
}

#[utoipa::path(put, path = "/vms/{id}/files", operation_id = "writeVmFile", tag = "vms",
    params(("path" = String, Query, description = "absolute path in the VM"),
        ("mode" = Option<String>, Query, description = "octal permission bits, default 644")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 204), (status = 404, description = "no such VM or directory"), (status = 409), (status = 422), (status = 503)))]
pub async fn write_file(
    State(app): App,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let path = file_path(&q)?;
    let mode = match &q.mode {
        None => 0o644,
        Some(m) => u32::from_str_radix(m, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| ApiError::invalid("mode must be octal permission bits, e.g. 755"))?,
    };
    let start = ExecStart::Write {
        path: path.clone(),
        mode,
    };
    let mut exec = crate::exec::open(&app.vms, &id, start).await?;
    let input = exec.session.input();
    let agent_error =
        |e: hatch_vmm::VmmError| ApiError::Unavailable("agent_unavailable", e.to_string());
    let mut chunks = body.into_data_stream();
    let send = async {
        while let Some(chunk) = chunks.next().await {
            let chunk =
                chunk.map_err(|e| ApiError::BadRequest(format!("reading the upload: {e}")))?;
            input.write(&chunk).await.map_err(agent_error)?;
        }
        input.eof().await.map_err(agent_error)
    };
    // The guest fails the session at once if the file cannot be opened:
    // watch for that while sending.
    tokio::select! {
        sent = send => sent?,
        event = exec.session.next() => return match event {
            Some(ExecEvent::Failed(why)) => Err(file_error(&path, why)),
            _ => Err(vm_went_away()),
        },
    }
    match exec.session.next().await {
        Some(ExecEvent::Exit { code: 0, .. }) => Ok(StatusCode::NO_CONTENT),
        Some(ExecEvent::Failed(why)) => Err(file_error(&path, why)),
        Some(other) => Err(ApiError::Internal(anyhow::anyhow!(
            "writing '{path}' failed: {other:?}"
        ))),
        None => Err(vm_went_away()),
    }
}
