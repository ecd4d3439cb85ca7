use std::io;

/// Errors of a QMP connection or command.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("QMP i/o failed")]
    Io(#[from] io::Error),
    #[error("QMP handshake failed: {0}")]
    Handshake(String),
    #[error("QEMU rejected {command}: {class}: {desc}")]
    Command {
        command: &'static str,
        class: String,
        desc: String,
    },
    #[error("unexpected answer to {command}")]
    Decode {
        command: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("QMP connection closed")]
    Disconnected,
    /// QEMU did not answer in time: it hangs (or is stopped).
    #[error("QEMU did not answer {command} within {} s", .after.as_secs_f64())]
    Timeout {
        command: &'static str,
        after: std::time::Duration,
    },
}
