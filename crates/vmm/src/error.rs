use std::io;
use std::path::PathBuf;

/// Errors of the QEMU driver.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot run {program}")]
    Exec {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("QEMU failed to start: {0}")]
    Launch(String),
    #[error("{tool} failed: {stderr}")]
    Tool { tool: &'static str, stderr: String },
    #[error("cannot read pid file {path}")]
    PidFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("process {0} is not a running QEMU of this VM")]
    NotOurProcess(i32),
    #[error("QMP socket path {0} is longer than a unix socket allows")]
    SocketPathTooLong(PathBuf),
    #[error("unknown accelerator {0:?} (expected auto, kvm or tcg)")]
    UnknownAccel(String),
    #[error("guest agent: {0}")]
    Agent(String),
    #[error("saving or loading machine state failed: {0}")]
    Migration(String),
    /// QEMU refused or failed to load a saved state: the guest never ran.
    #[error("QEMU could not load the saved state: {0}")]
    StateRejected(String),
    /// QEMU stopped answering QMP; it was killed.
    #[error("QEMU stopped answering ({command} got no answer within {} s) and was killed", .after.as_secs_f64())]
    Hung {
        command: &'static str,
        after: std::time::Duration,
    },
    #[error(transparent)]
    Qmp(#[from] hatch_qmp::QmpError),
    #[error("i/o error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}
