//! A running QEMU process and its QMP session.
//!
//! QEMU is started with `-daemonize`, so every VM, whether launched by this
//! daemon or by a previous one, is handled the same way: known by its pid file
//! and QMP socket, and seen to end when its QMP connection closes.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use hatch_qmp::commands::{HumanMonitorCommand, Quit};
use hatch_qmp::{Event, Qmp};
use tokio::process::Command;
use tokio::sync::broadcast;

use crate::spec::NETDEV_ID;
use crate::{MachineSpec, PortForward, VmmError};

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
    pub async fn launch(qemu: &Path, spec: &MachineSpec) -> Result<Machine, VmmError> {
        if spec.qmp_socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(VmmError::SocketPathTooLong(spec.qmp_socket.clone()));
        }
        for stale in [&spec.qmp_socket, &spec.pid_file] {
            remove_if_exists(stale)?;
        }
        let out = Command::new(qemu)
            .args(spec.args())
            .stdin(std::process::Stdio::null())
            // Its own process group: a Ctrl-C aimed at `hatch serve` in a
            // terminal must not reach the VMs.
            .process_group(0)
            .output()
            .await
            .map_err(|source| VmmError::Exec {
                program: qemu.display().to_string(),
                source,
            })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(VmmError::Launch(if stderr.is_empty() {
                format!("qemu exited with {}", out.status)
            } else {
                stderr
            }));
        }
        Self::adopt(&spec.pid_file, &spec.qmp_socket).await
    }

    /// Attach to a QEMU started earlier (by this or a previous daemon).
    pub async fn adopt(pid_file: &Path, qmp_socket: &Path) -> Result<Machine, VmmError> {
        let pid = read_pid(pid_file)?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        let ours =
            cmdline.contains("qemu-system") && cmdline.contains(&*qmp_socket.display().to_string());
        if !ours {
            return Err(VmmError::NotOurProcess(pid));
        }
        let qmp = Qmp::connect(qmp_socket).await?;
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

    /// Wait until QEMU has gone.
    pub async fn wait_exit(&self) -> Exit {
        self.qmp.closed().await;
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
        match self.qmp.execute(&Quit).await {
            Ok(_) | Err(hatch_qmp::QmpError::Disconnected) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(self.wait_exit().await)
    }

    /// Kill QEMU without asking (used when QMP no longer answers).
    pub fn kill(&self) {
        // SAFETY: kill(2) with a pid and a signal number has no memory-safety
        // preconditions; the worst case is signalling a reused pid, which the
        // caller avoids by only killing a pid it verified as its QEMU.
        let rc = unsafe { libc::kill(self.pid, libc::SIGKILL) };
        if rc != 0 {
            tracing::debug!(
                pid = self.pid,
                "kill failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }

    /// Add a host-to-guest port forward to the running VM.
    pub async fn add_forward(&self, forward: PortForward) -> Result<(), VmmError> {
        let out = self
            .qmp
            .execute(&HumanMonitorCommand {
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
