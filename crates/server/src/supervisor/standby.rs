//! A standby QEMU: started for a suspended VM ahead of its next wake, with
//! the command line that wake will use, waiting for its state
//! (`-incoming defer`). A wake from the local copy that finds one whose
//! command line and RAM file are exactly its own loads the state into it
//! and skips QEMU's start (35-50 ms of a ~120 ms wake under TCG); any other
//! launch of the VM ends it first. docs/PERFORMANCE.md, "Standby QEMU".
//!
//! A warm standby is the QEMU that ran the VM, kept paused by its suspend
//! right after it saved the state (`postmigrate`), its disk already
//! switched to the layer the next wake writes to. It stands for a QEMU
//! started with that wake's command line and loaded with that state, so it
//! fits the same way; a wake only lets it run (6-12 ms against 70-110 ms
//! into a fresh QEMU: its translated code, page tables and allocations are
//! all warm).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hatch_qmp::commands::QueryStatus;
use hatch_vmm::{Machine, MachineSpec};

/// How long a standby may take to say it still waits for its state.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// What a standby QEMU was launched as.
#[derive(Debug, Clone)]
pub struct LaunchedAs {
    /// Its spec, RAM file named where it lay at launch (the snapshot's
    /// local copy, which the wake then moves into the VM's directory).
    pub spec: MachineSpec,
    /// Device and inode of that RAM file: a rename keeps them.
    pub mem_file: (u64, u64),
}

impl LaunchedAs {
    /// Whether this is the QEMU that `wanted` would launch: the same
    /// arguments once the RAM file is named where `wanted` has it, and that
    /// name holding the very file the standby maps.
    pub fn fits(&self, wanted: &MachineSpec) -> bool {
        let mut mine = self.spec.clone();
        mine.mem_path.clone_from(&wanted.mem_path);
        mine.args() == wanted.args() && file_id(&wanted.mem_path) == Some(self.mem_file)
    }
}

pub struct Standby {
    pub machine: Arc<Machine>,
    /// The snapshot whose wake it was started for.
    pub snapshot_id: String,
    pub launched: LaunchedAs,
    /// A warm standby: the state of `snapshot_id` is already in it.
    pub warm: bool,
}

impl Standby {
    /// Whether QEMU is alive and still as it was left: waiting for an
    /// incoming state, or (warm) paused after saving its own.
    pub async fn waiting(&self) -> bool {
        let expected = if self.warm {
            "postmigrate"
        } else {
            "inmigrate"
        };
        let asked = tokio::time::timeout(ASK_TIMEOUT, self.machine.command(&QueryStatus)).await;
        matches!(asked, Ok(Ok(s)) if s.status == expected && !s.running)
    }

    /// End its QEMU (it does not run the guest again: nothing is lost).
    pub async fn discard(self) {
        self.machine.kill();
        self.machine.wait_exit().await;
    }
}

/// Device and inode of `path`, if it exists.
pub fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hatch_vmm::{Accel, PortForward};

    fn spec(mem: &Path, host_port: u16) -> MachineSpec {
        MachineSpec {
            accel: Accel::Tcg,
            cpu_model: "max".into(),
            vcpus: 1,
            memory_mib: 256,
            kernel: "/img/vmlinux".into(),
            initrd: "/img/initrd".into(),
            cmdline: "console=ttyS0".into(),
            disk: "/vm/layer-2.qcow2".into(),
            disk_node: "layer2".into(),
            mem_path: mem.to_path_buf(),
            qmp_socket: "/run/vm.qmp".into(),
            agent_socket: "/run/vm.agent".into(),
            console_log: "/vm/console.log".into(),
            pid_file: "/run/vm.pid".into(),
            forwards: vec![PortForward {
                host: host_port,
                guest: 8080,
            }],
            tsc_khz: Some(2_000_000),
            extra_cmdline: Vec::new(),
            incoming: true,
            egress_tap: None,
        }
    }

    #[test]
    fn a_standby_fits_the_wake_that_moved_its_ram_file() {
        let dir = tempfile::tempdir().unwrap();
        let (image, vm_mem) = (dir.path().join("snap-mem"), dir.path().join("vm-mem"));
        std::fs::write(&image, b"ram").unwrap();
        let launched = LaunchedAs {
            spec: spec(&image, 40000),
            mem_file: file_id(&image).unwrap(),
        };
        // Before the wake moves the image, the VM's RAM file is not it.
        assert!(!launched.fits(&spec(&vm_mem, 40000)));
        std::fs::rename(&image, &vm_mem).unwrap();
        assert!(launched.fits(&spec(&vm_mem, 40000)));
    }

    #[test]
    fn a_standby_does_not_fit_another_command_line_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let mem = dir.path().join("mem");
        std::fs::write(&mem, b"ram").unwrap();
        let launched = LaunchedAs {
            spec: spec(&mem, 40000),
            mem_file: file_id(&mem).unwrap(),
        };
        assert!(launched.fits(&spec(&mem, 40000)));
        // Another host port (a route added while suspended, a port taken).
        assert!(!launched.fits(&spec(&mem, 40001)));
        // Another disk layer.
        let mut other = spec(&mem, 40000);
        other.disk = "/vm/layer-3.qcow2".into();
        assert!(!launched.fits(&other));
        // Another file under the same name (a copy, not the image it maps,
        // which stays open, as QEMU holds it: its inode is not reused).
        let _held = std::fs::File::open(&mem).unwrap();
        std::fs::remove_file(&mem).unwrap();
        std::fs::write(&mem, b"ram").unwrap();
        assert!(!launched.fits(&spec(&mem, 40000)));
    }
}
