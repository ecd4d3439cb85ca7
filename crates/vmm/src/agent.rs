//! The host side of the guest agent channel (a virtio-serial port backed by
//! a unix socket per VM). See `hatch-guest`'s `agent` module for the guest.

use std::io::Read;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::VmmError;

/// The guest's name for the port.
pub const PORT_NAME: &str = "org.hatch.agent";

/// How long the guest agent may take to answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(3);

/// A connection to a VM's agent port. Holding it open also lets the guest
/// agent block on reads instead of polling for a host.
pub struct Agent {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
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
        Ok(Agent {
            reader: BufReader::new(r),
            writer: w,
        })
    }

    /// Set the guest's wall clock to the host's and reseed its RNG.
    pub async fn sync_clock_and_rng(&mut self) -> Result<(), VmmError> {
        let mut seed = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .map_err(|source| VmmError::Io {
                path: "/dev/urandom".into(),
                source,
            })?;
        let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let line = format!("sync {}.{:09} {hex}\n", now.as_secs(), now.subsec_nanos());
        let exchange = async {
            self.writer.write_all(line.as_bytes()).await?;
            let mut reply = String::new();
            self.reader.read_line(&mut reply).await?;
            Ok::<String, std::io::Error>(reply)
        };
        let reply = tokio::time::timeout(REPLY_TIMEOUT, exchange)
            .await
            .map_err(|_| VmmError::Agent("the guest agent did not answer".into()))?
            .map_err(|e| VmmError::Agent(e.to_string()))?;
        match reply.trim() {
            "ok" => Ok(()),
            other => Err(VmmError::Agent(format!(
                "the guest agent answered {other:?}"
            ))),
        }
    }
}
