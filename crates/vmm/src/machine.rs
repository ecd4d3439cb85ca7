//! A running QEMU process and its QMP session.
//!
//! QEMU is started with `-daemonize`, so every VM, whether launched by this
//! daemon or by a previous one, is handled the same way: known by its pid file
//! and QMP socket, and seen to end when its QMP connection closes.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use hatch_qmp::commands::{HumanMonitorCommand, Quit};
use hatch_qmp::{Event, Qmp};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::process::Command;
use tokio::sync::broadcast;

use crate::spec::NETDEV_ID;
use crate::{MachineSpec, PortForward, VmmError};

/// How long QEMU may take until it has daemonized (initialised the machine).
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the QMP greeting and negotiation may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a process may take to go after its QMP socket closed or SIGKILL.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest unix socket path (sun_path is 108 bytes including the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// How a machine ended, as far as QEMU told us before it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// The `reason` of QEMU's SHUTDOWN event (`guest-shutdown`, `guest-panic`,
    /// `host-qmp-quit`, ...), or None if QEMU vanished without one (killed).
    pub reason: Option<String>,
}

pub struct Machine {
    pid: i32,
    qmp: Qmp,
    /// Subscribed at attach time, read once QMP has closed: QEMU sends its
    /// SHUTDOWN event before it hangs up, so by then the event is buffered here.
    events: Mutex<broadcast::Receiver<Event>>,
    exit_reason: Mutex<Option<String>>,
}

impl Machine {
    /// Launch QEMU for `spec`; returns once QEMU is initialised and QMP answers.
    /// On any failure no QEMU of this launch is left running.
    pub async fn launch(qemu: &Path, spec: &MachineSpec) -> Result<Machine, VmmError> {
        if spec.qmp_socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(VmmError::SocketPathTooLong(spec.qmp_socket.clone()));
        }
        for stale in [&spec.qmp_socket, &spec.pid_file] {
            remove_if_exists(stale)?;
        }
        let launched = Command::new(qemu)
            .args(spec.args())
            // QEMU needs nothing of the daemon's environment, which holds
            // secrets (API key, S3 credentials) that /proc/<pid>/environ
            // would otherwise show for as long as the VM runs.
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(std::process::Stdio::null())
            // Its own process group: a Ctrl-C aimed at `hatch serve` in a
            // terminal must not reach the VMs.
            .process_group(0)
            .kill_on_drop(true)
            .output();
        let out = match tokio::time::timeout(LAUNCH_TIMEOUT, launched).await {
            Ok(out) => out.map_err(|source| VmmError::Exec {
                program: qemu.display().to_string(),
                source,
            })?,
            Err(_) => {
                kill_if_ours(&spec.pid_file, &spec.qmp_socket).await;
                return Err(VmmError::Launch(format!(
                    "QEMU did not finish starting within {}s",
                    LAUNCH_TIMEOUT.as_secs()
                )));
            }
        };
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(VmmError::Launch(if stderr.is_empty() {
                format!("qemu exited with {}", out.status)
            } else {
                stderr
            }));
        }
        match Self::adopt(&spec.pid_file, &spec.qmp_socket).await {
            Ok(machine) => Ok(machine),
            Err(e) => {
                kill_if_ours(&spec.pid_file, &spec.qmp_socket).await;
                Err(e)
            }
        }
    }

    /// Attach to a QEMU started earlier (by this or a previous daemon). A QEMU
    /// of ours whose QMP does not answer is killed: it would hold the VM's
    /// disk lock while being of no use.
    pub async fn adopt(pid_file: &Path, qmp_socket: &Path) -> Result<Machine, VmmError> {
        let pid = find_ours(pid_file, qmp_socket)?;
        let qmp = match tokio::time::timeout(QMP_TIMEOUT, Qmp::connect(qmp_socket)).await {
            Ok(Ok(qmp)) => qmp,
            Ok(Err(e)) => {
                kill_and_wait(pid).await;
                return Err(e.into());
            }
            Err(_) => {
                kill_and_wait(pid).await;
                return Err(VmmError::Launch(format!(
                    "QMP did not answer within {}s",
                    QMP_TIMEOUT.as_secs()
                )));
            }
        };
        let events = Mutex::new(qmp.events());
        Ok(Machine {
            pid,
            qmp,
            events,
            exit_reason: Mutex::new(None),
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// How long any one QMP command may take before QEMU counts as hung.
    pub fn set_command_timeout(&self, timeout: Duration) {
        self.qmp.set_timeout(timeout);
    }

    /// Run a QMP command. A QEMU that does not answer in time hangs: it is
    /// killed (it would otherwise hold the VM's disk and memory while being
    /// of no use), and the command fails with [`VmmError::Hung`].
    pub async fn command<C: hatch_qmp::Command>(&self, c: &C) -> Result<C::Response, VmmError> {
        match self.qmp.execute(c).await {
            Ok(r) => Ok(r),
            Err(hatch_qmp::QmpError::Timeout { command, after }) => {
                tracing::error!(pid = self.pid, command, "QEMU hangs; killing it");
                self.kill();
                self.wait_exit().await;
                Err(VmmError::Hung { command, after })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Whether QEMU is still there (its QMP connection is open).
    pub fn is_alive(&self) -> bool {
        !self.qmp.is_closed()
    }

    /// Wait until QEMU has gone: its QMP connection closed and its process ended.
    pub async fn wait_exit(&self) -> Exit {
        self.qmp.closed().await;
        // QEMU closes its sockets before it has finished exiting.
        if tokio::time::timeout(EXIT_TIMEOUT, wait_pid_exit(self.pid))
            .await
            .is_err()
        {
            tracing::warn!(
                pid = self.pid,
                "QEMU closed QMP but did not exit; killing it"
            );
            kill_and_wait(self.pid).await;
        }
        let mut reason = lock(&self.exit_reason);
        let mut events = lock(&self.events);
        loop {
            match events.try_recv() {
                Ok(ev) if ev.event == "SHUTDOWN" => {
                    let r = ev.data["reason"].as_str().unwrap_or("unknown");
                    *reason = Some(r.to_string());
                }
                Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
        Exit {
            reason: reason.clone(),
        }
    }

    /// Ask QEMU to exit now (block devices are flushed) and wait for it.
    pub async fn quit(&self) -> Result<Exit, VmmError> {
        match self.command(&Quit).await {
            Ok(_) | Err(VmmError::Qmp(hatch_qmp::QmpError::Disconnected)) => {}
            Err(e) => return Err(e),
        }
        Ok(self.wait_exit().await)
    }

    /// Kill QEMU without asking (used when QMP no longer answers).
    pub fn kill(&self) {
        kill(self.pid);
    }

    /// Add a host-to-guest port forward to the running VM.
    pub async fn add_forward(&self, forward: PortForward) -> Result<(), VmmError> {
        let out = self
            .command(&HumanMonitorCommand {
                command_line: format!("hostfwd_add {NETDEV_ID} {}", forward.rule()),
            })
            .await?;
        // HMP prints nothing on success and a message on failure.
        if out.trim().is_empty() {
            Ok(())
        } else {
            Err(VmmError::Tool {
                tool: "hostfwd_add",
                stderr: out.trim().to_string(),
            })
        }
    }
}

fn read_pid(path: &Path) -> Result<i32, VmmError> {
    let text = std::fs::read_to_string(path).map_err(|source| VmmError::PidFile {
        path: path.to_path_buf(),
        source,
    })?;
    text.trim().parse().map_err(|_| VmmError::PidFile {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not a pid"),
    })
}

/// The pid in `pid_file`, if that process is a live QEMU of this VM: its
/// command line names this VM's QMP socket, which no other process has.
fn find_ours(pid_file: &Path, qmp_socket: &Path) -> Result<i32, VmmError> {
    let pid = read_pid(pid_file)?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let socket = qmp_socket.display().to_string();
    let ours = cmdline
        .split(|b| *b == 0)
        .any(|arg| String::from_utf8_lossy(arg).contains(&*socket));
    if ours {
        Ok(pid)
    } else {
        Err(VmmError::NotOurProcess(pid))
    }
}

async fn kill_if_ours(pid_file: &Path, qmp_socket: &Path) {
    if let Ok(pid) = find_ours(pid_file, qmp_socket) {
        kill_and_wait(pid).await;
    }
}

fn kill(pid: i32) {
    // SAFETY: kill(2) with a pid and a signal number has no memory-safety
    // preconditions; callers only pass a pid they verified as this VM's QEMU.
    let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
    if rc != 0 {
        tracing::debug!(pid, "kill failed: {}", std::io::Error::last_os_error());
    }
}

async fn kill_and_wait(pid: i32) {
    kill(pid);
    if tokio::time::timeout(EXIT_TIMEOUT, wait_pid_exit(pid))
        .await
        .is_err()
    {
        tracing::error!(pid, "QEMU survived SIGKILL");
    }
}

/// Resolves when process `pid` has exited (it need not be our child), using a
/// pidfd, which becomes readable when the process terminates.
async fn wait_pid_exit(pid: i32) {
    // SAFETY: pidfd_open takes two integers and returns a new descriptor or -1;
    // no memory is shared with the kernel.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        // ESRCH: already gone. Anything else: we cannot watch; do not block.
        return;
    }
    // SAFETY: `fd` is a descriptor the kernel just returned to us and that
    // nothing else owns, so OwnedFd may take ownership (and close it).
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // SAFETY: the AsyncFd owns the OwnedFd, which keeps the same open
    // descriptor until the AsyncFd is dropped.
    match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
        Ok(afd) => {
            let _ = afd.readable().await;
        }
        Err(e) => tracing::debug!(pid, error = %e, "cannot watch pidfd"),
    }
}

fn remove_if_exists(path: &PathBuf) -> Result<(), VmmError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(VmmError::Io {
            path: path.clone(),
            source,
        }),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data behind these locks stays consistent even after a panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
