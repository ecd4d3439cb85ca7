//! The daemon's line of JSON to the lazy RAM server and back, over a Unix
//! socket: one request per connection.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::LazyRamError;
use crate::cache::Status;

/// Longest answer accepted (a status lists chunk numbers: a few hundred
/// KiB for the largest guests).
const MAX_LINE: usize = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// What is here, dirty, touched, failing.
    Status,
    /// Write the guest's dirty pages back into the cache file and make it
    /// durable, then answer the status.
    Sync,
    /// End (after a sync) once process `pid` (the QEMU mapping the file)
    /// has exited, even if no one says stop.
    Watch { pid: u32 },
    /// Sync and record the end status, answer with it, then unmount and
    /// exit.
    Stop,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Send `req` to the server listening on `socket`.
pub async fn request(socket: &Path, req: &Request) -> Result<Response, LazyRamError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| LazyRamError::io(format!("connecting to {}", socket.display()), e))?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(|e| LazyRamError::Control(e.to_string()))?;
    line.push(b'\n');
    write
        .write_all(&line)
        .await
        .map_err(|e| LazyRamError::io("sending a lazy RAM request", e))?;
    let answer = read_line(read).await?;
    let resp: Response = serde_json::from_slice(&answer)
        .map_err(|e| LazyRamError::Control(format!("unreadable answer: {e}")))?;
    if !resp.ok {
        return Err(LazyRamError::Control(
            resp.error.unwrap_or_else(|| "failed".into()),
        ));
    }
    Ok(resp)
}

/// One line from `r`, at most [`MAX_LINE`] bytes.
pub(crate) async fn read_line(
    r: impl tokio::io::AsyncRead + Unpin,
) -> Result<Vec<u8>, LazyRamError> {
    let mut line = Vec::new();
    let mut r = BufReader::new(r.take(MAX_LINE as u64));
    r.read_until(b'\n', &mut line)
        .await
        .map_err(|e| LazyRamError::io("reading a lazy RAM message", e))?;
    if line.last() != Some(&b'\n') {
        return Err(LazyRamError::Control(
            "message cut short or too long".into(),
        ));
    }
    line.pop();
    Ok(line)
}
