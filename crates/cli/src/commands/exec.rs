//! `hatch vm exec` (a command in a VM, live, over the API's WebSocket) and
//! `hatch vm cp` (files in and out through `/vms/{id}/files`).

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{Context, bail};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::client::{ApiArgs, ApiError, Client};

#[derive(Args)]
pub struct ExecArgs {
    /// VM id or name (a suspended VM is woken).
    pub vm: String,
    /// Send this terminal's input to the command.
    #[arg(short, long)]
    pub interactive: bool,
    /// Run the command on a pseudo-terminal (with -i: an interactive shell).
    #[arg(short, long)]
    pub tty: bool,
    /// Set an environment variable (KEY=VALUE; repeatable) [default: the
    /// image's environment only].
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory in the VM [default: the image's].
    #[arg(short = 'w', long)]
    pub workdir: Option<String>,
    /// The command and its arguments (after `--`).
    #[arg(required = true, last = true)]
    pub cmd: Vec<String>,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Args)]
pub struct CpArgs {
    /// Source: a local file (`-` for stdin) or VM:PATH.
    pub src: String,
    /// Destination: a local file (`-` for stdout) or VM:PATH.
    pub dst: String,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Run the command; returns its exit code.
pub async fn exec(args: ExecArgs) -> anyhow::Result<i32> {
    let c = Client::new(&args.api)?;
    let id = c.vm_id(&args.vm).await?;
    let mut env = BTreeMap::new();
    for kv in &args.env {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--env takes KEY=VALUE, not {kv:?}");
        };
        env.insert(k.to_string(), v.to_string());
    }
    let url = format!(
        "{}/vms/{id}/exec/ws",
        c.base()
            .replacen("http://", "ws://", 1)
            .replacen("https://", "wss://", 1)
    );
    let mut req = url.as_str().into_client_request()?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", c.key())
            .parse()
            .context("the API key is not a valid header value")?,
    );
    let (ws, _) = match tokio_tungstenite::connect_async(req).await {
        Ok(ok) => ok,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let status = resp.status();
            let body: Value = resp
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            return Err(ApiError {
                status,
                code: body["error"]["code"].as_str().unwrap_or("error").into(),
                message: body["error"]["message"]
                    .as_str()
                    .unwrap_or("the exec request was refused")
                    .into(),
            }
            .into());
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("connecting to {url}"))),
    };
    let (mut tx, mut rx) = ws.split();
    let (rows, cols) = if args.tty { terminal::size() } else { (0, 0) };
    let start = json!({"cmd": args.cmd, "env": env, "cwd": args.workdir, "tty": args.tty, "rows": rows, "cols": cols});
    tx.send(Message::Text(start.to_string().into())).await?;
    let _raw = (args.tty && args.interactive)
        .then(terminal::Raw::enable)
        .flatten();
    // Input and resizes go out from their own task.
    let interactive = args.interactive;
    let tty = args.tty;
    let sender = tokio::spawn(async move {
        if !interactive {
            let _ = tx.send(Message::Text(r#"{"eof":true}"#.into())).await;
            return;
        }
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 16 << 10];
        let mut winch = tty
            .then(|| {
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok()
            })
            .flatten();
        loop {
            tokio::select! {
                n = stdin.read(&mut buf) => match n {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(Message::Text(r#"{"eof":true}"#.into())).await;
                        return;
                    }
                    Ok(n) => {
                        let mut msg = Vec::with_capacity(n + 1);
                        msg.push(0u8);
                        msg.extend_from_slice(&buf[..n]);
                        if tx.send(Message::Binary(msg.into())).await.is_err() {
                            return;
                        }
                    }
                },
                Some(()) = async { match winch.as_mut() { Some(w) => w.recv().await, None => std::future::pending().await } } => {
                    let (rows, cols) = terminal::size();
                    let msg = json!({"resize": [rows, cols]}).to_string();
                    let _ = tx.send(Message::Text(msg.into())).await;
                }
            }
        }
    });
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut code = None;
    while let Some(msg) = rx.next().await {
        match msg.context("the exec connection broke")? {
            Message::Binary(b) => match b.split_first() {
                Some((1, data)) => {
                    stdout.write_all(data).await?;
                    stdout.flush().await?;
                }
                Some((2, data)) => {
                    stderr.write_all(data).await?;
                    stderr.flush().await?;
                }
                _ => {}
            },
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).context("a bad message from the API")?;
                if let Some(e) = v.get("error") {
                    bail!(
                        "{}: {}",
                        e["code"].as_str().unwrap_or("error"),
                        e["message"].as_str().unwrap_or("exec failed")
                    );
                }
                code = v["exit_code"].as_i64();
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    sender.abort();
    match code {
        Some(code) => Ok(code as i32),
        None => bail!("the exec connection closed before the command ended"),
    }
}

/// `VM:PATH` -> (VM, PATH); a local path otherwise.
fn remote(arg: &str) -> Option<(&str, &str)> {
    let (vm, path) = arg.split_once(':')?;
    (!vm.is_empty() && !vm.contains('/') && path.starts_with('/')).then_some((vm, path))
}

pub async fn cp(args: CpArgs) -> anyhow::Result<()> {
    let c = Client::new(&args.api)?;
    match (remote(&args.src), remote(&args.dst)) {
        (Some((vm, path)), None) => {
            let id = c.vm_id(vm).await?;
            let req = c
                .streaming(Method::GET, &format!("/vms/{id}/files"))?
                .query(&[("path", path)]);
            let mut resp = c
                .send(req, Method::GET, &format!("/vms/{id}/files"))
                .await?;
            if args.dst == "-" {
                let mut out = std::io::stdout().lock();
                while let Some(chunk) = resp.chunk().await.context("reading the file")? {
                    out.write_all(&chunk)?;
                }
                return Ok(());
            }
            let partial = format!("{}.part", args.dst);
            let mut file = tokio::fs::File::create(&partial)
                .await
                .with_context(|| format!("creating {partial}"))?;
            let copied = async {
                while let Some(chunk) = resp.chunk().await.context("reading the file")? {
                    file.write_all(&chunk).await?;
                }
                file.flush().await?;
                anyhow::Ok(())
            }
            .await;
            if let Err(e) = copied {
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(e);
            }
            tokio::fs::rename(&partial, &args.dst)
                .await
                .with_context(|| format!("renaming {partial} to {}", args.dst))?;
            Ok(())
        }
        (None, Some((vm, path))) => {
            let id = c.vm_id(vm).await?;
            let (body, mode) = if args.src == "-" {
                let stream = tokio_util::io::ReaderStream::new(tokio::io::stdin());
                (reqwest::Body::wrap_stream(stream), 0o644)
            } else {
                let f = tokio::fs::File::open(&args.src)
                    .await
                    .with_context(|| format!("opening {}", args.src))?;
                use std::os::unix::fs::PermissionsExt;
                let mode = f.metadata().await?.permissions().mode() & 0o7777;
                let stream = tokio_util::io::ReaderStream::new(f);
                (reqwest::Body::wrap_stream(stream), mode)
            };
            let mode = format!("{mode:o}");
            let req = c
                .streaming(Method::PUT, &format!("/vms/{id}/files"))?
                .query(&[("path", path), ("mode", mode.as_str())])
                .body(body);
            c.send(req, Method::PUT, &format!("/vms/{id}/files"))
                .await?;
            Ok(())
        }
        (Some(_), Some(_)) => {
            bail!("copy between two VMs is not supported; copy through a local file")
        }
        (None, None) => bail!("one of SRC and DST must be VM:/absolute/path"),
    }
}

/// This terminal: its size, and raw mode for an interactive pty.
mod terminal {
    /// Rows and columns of the terminal on stdout (0, 0 if none).
    pub fn size() -> (u16, u16) {
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes a winsize into `ws`, which outlives the call.
        let rc = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) };
        if rc != 0 {
            return (0, 0);
        }
        (ws.ws_row, ws.ws_col)
    }

    /// Raw mode on stdin until dropped (keys go to the VM's pty as typed).
    pub struct Raw(libc::termios);

    impl Raw {
        pub fn enable() -> Option<Raw> {
            // SAFETY: termios is plain data; tcgetattr fills it in.
            let mut saved: libc::termios = unsafe { std::mem::zeroed() };
            // SAFETY: fd 0 and a valid termios pointer.
            if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
                return None; // not a terminal
            }
            let mut raw = saved;
            // SAFETY: cfmakeraw only edits the struct; tcsetattr reads it.
            unsafe {
                libc::cfmakeraw(&mut raw);
                libc::tcsetattr(0, libc::TCSANOW, &raw);
            }
            Some(Raw(saved))
        }
    }

    impl Drop for Raw {
        fn drop(&mut self) {
            // SAFETY: restores the settings read in `enable`.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.0) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::remote;

    #[test]
    fn remote_paths_are_told_from_local_ones() {
        assert_eq!(remote("web:/etc/hosts"), Some(("web", "/etc/hosts")));
        assert_eq!(remote("vm-abc:/x"), Some(("vm-abc", "/x")));
        assert_eq!(remote("./a:b"), None);
        assert_eq!(remote("file.txt"), None);
        assert_eq!(remote("web:relative"), None);
        assert_eq!(remote("/tmp/a:/b"), None);
    }
}
