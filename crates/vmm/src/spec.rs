//! The QEMU command line of a Hatch microVM, built from a plain description.
//!
//! Kept pure (no I/O) so that it is unit-tested argument by argument.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::Accel;

/// A host port on 127.0.0.1 forwarded to a guest TCP port (QEMU user-mode net).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortForward {
    pub host: u16,
    pub guest: u16,
}

impl PortForward {
    /// The `hostfwd` rule in QEMU's syntax.
    pub fn rule(&self) -> String {
        format!("tcp:127.0.0.1:{}-:{}", self.host, self.guest)
    }
}

/// Everything needed to launch one VM.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    pub accel: Accel,
    /// QEMU `-cpu` model: [`default_cpu_model`] unless the operator pinned
    /// one (a cluster under KVM needs a model every host provides).
    pub cpu_model: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Kernel command line from the image; Hatch appends its own parameters.
    pub cmdline: String,
    /// The disk's active (writable) qcow2 layer; older layers are its backing chain.
    pub disk: PathBuf,
    /// Block node name of the active layer (needed to freeze it later).
    pub disk_node: String,
    /// Guest RAM file (memory-backend-file, share=on), so that RAM can later be
    /// captured without streaming it through the migration channel.
    pub mem_path: PathBuf,
    pub qmp_socket: PathBuf,
    /// Unix socket of the guest agent's virtio-serial port.
    pub agent_socket: PathBuf,
    pub console_log: PathBuf,
    pub pid_file: PathBuf,
    pub forwards: Vec<PortForward>,
    /// Host TSC frequency for `tsc_early_khz` under TCG.
    pub tsc_khz: Option<u64>,
    /// Extra kernel parameters, e.g. `hatch.disk_grow=1`.
    pub extra_cmdline: Vec<String>,
    /// Wait for an incoming migration (`-incoming defer`): a restore.
    pub incoming: bool,
    /// A second network card on this tap device (QEMU creates it, and it
    /// goes when QEMU exits): the VM's outbound network. The first card
    /// (user-mode, restricted) carries only the proxy's inbound traffic.
    pub egress_tap: Option<String>,
}

/// QEMU's id of the guest agent's character device.
pub const AGENT_CHARDEV: &str = "agent";
/// Alignment of the guest RAM mapping in QEMU: the size of a huge page.
const RAM_ALIGN: &str = "2M";

/// The MAC address of the outbound card, by which the guest tells it from
/// the inbound one (virtio-mmio cards are not enumerated in a fixed order).
pub const EGRESS_MAC: &str = "52:54:00:4e:45:54";

/// Network device id of the outbound card.
pub const EGRESS_NETDEV_ID: &str = "net1";

/// The CPU model when none is pinned: `host` passes the real CPU through
/// under KVM (ties a snapshot to its host's CPU); under TCG `max` emulates
/// every feature QEMU can, the same on every host.
pub fn default_cpu_model(accel: Accel) -> &'static str {
    match accel {
        Accel::Kvm => "host",
        Accel::Tcg => "max",
    }
}

/// Whether `model` looks like a QEMU `-cpu` value (a model name with
/// optional `,feature` settings), not something else smuggled in.
pub fn valid_cpu_model(model: &str) -> bool {
    !model.is_empty()
        && model.len() <= 256
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-,+=".contains(&b))
        && model.as_bytes()[0].is_ascii_alphanumeric()
}

/// Network device id used by `hostfwd_add` at run time.
pub const NETDEV_ID: &str = "net0";

impl MachineSpec {
    /// The full kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        let mut parts = vec![self.cmdline.trim().to_string()];
        if let (Accel::Tcg, Some(khz)) = (self.accel, self.tsc_khz) {
            parts.push(format!("tsc_early_khz={khz}"));
        }
        parts.extend(self.extra_cmdline.iter().cloned());
        parts.retain(|p| !p.is_empty());
        parts.join(" ")
    }

    /// QEMU's arguments (without the program name).
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: String| a.push(s.into());
        push("-M".into());
        push("microvm,acpi=on,memory-backend=mem".into());
        push("-accel".into());
        push(self.accel.as_str().into());
        push("-cpu".into());
        push(self.cpu_model.clone());
        push("-smp".into());
        push(self.vcpus.to_string());
        push("-m".into());
        push(format!("{}M", self.memory_mib));
        push("-object".into());
        // align: QEMU asks for huge pages on guest RAM (MADV_HUGEPAGE), so a
        // kernel whose ext4 has large folios (6.18 here) caches the RAM file
        // in 2 MiB folios. Mapped at an address that is not 2 MiB aligned,
        // each folio is mapped 4 KiB at a time, and after the suspend's
        // fsync every first write to each 4 KiB page faults into the
        // filesystem's mkwrite for the whole 2 MiB folio. Aligned, a folio
        // is mapped whole: one fault per 2 MiB (docs/PERFORMANCE.md, "RAM
        // mapped in 2 MiB").
        push(format!(
            "memory-backend-file,id=mem,size={}M,mem-path={},share=on,align={RAM_ALIGN}",
            self.memory_mib,
            escape(&self.mem_path)
        ));
        push("-kernel".into());
        push(self.kernel.display().to_string());
        push("-initrd".into());
        push(self.initrd.display().to_string());
        push("-append".into());
        push(self.kernel_cmdline());
        push("-blockdev".into());
        push(format!(
            "driver=qcow2,node-name={},file.driver=file,file.filename={}",
            self.disk_node,
            escape(&self.disk)
        ));
        push("-device".into());
        push(format!("virtio-blk-device,drive={}", self.disk_node));
        // restrict=on: the guest reaches nothing outside (not the host's
        // loopback services through 10.0.2.2, not the internet); only the
        // host-to-guest forwards below exist.
        let mut netdev = format!("user,id={NETDEV_ID},restrict=on");
        for f in &self.forwards {
            netdev.push_str(",hostfwd=");
            netdev.push_str(&f.rule());
        }
        push("-netdev".into());
        push(netdev);
        push("-device".into());
        push(format!("virtio-net-device,netdev={NETDEV_ID}"));
        if let Some(tap) = &self.egress_tap {
            push("-netdev".into());
            push(format!(
                "tap,id={EGRESS_NETDEV_ID},ifname={},script=no,downscript=no",
                escape(std::path::Path::new(tap))
            ));
            push("-device".into());
            push(format!(
                "virtio-net-device,netdev={EGRESS_NETDEV_ID},mac={EGRESS_MAC}"
            ));
        }
        push("-chardev".into());
        push(format!(
            "file,id=console,path={},append=on",
            escape(&self.console_log)
        ));
        push("-serial".into());
        push("chardev:console".into());
        // The guest agent channel (clock and RNG after a restore).
        push("-device".into());
        push("virtio-serial-device".into());
        push("-chardev".into());
        push(format!(
            "socket,id={AGENT_CHARDEV},path={},server=on,wait=off",
            escape(&self.agent_socket)
        ));
        push("-device".into());
        push(format!(
            "virtserialport,chardev={AGENT_CHARDEV},name={}",
            crate::agent::PORT_NAME
        ));
        push("-qmp".into());
        push(format!(
            "unix:{},server=on,wait=off",
            escape(&self.qmp_socket)
        ));
        if self.incoming {
            push("-incoming".into());
            push("defer".into());
        }
        push("-pidfile".into());
        push(self.pid_file.display().to_string());
        for fixed in [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            // A guest reboot or panic ends the VM instead of looping.
            "-no-reboot",
            // Fork once QEMU is initialised: when the launching process exits
            // successfully, the QMP socket is ready and the VM no longer
            // depends on `hatch serve` staying alive.
            "-daemonize",
        ] {
            push(fixed.into());
        }
        a
    }
}

/// QEMU option values separate options with commas; a literal comma is doubled.
fn escape(p: &std::path::Path) -> String {
    p.display().to_string().replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(accel: Accel) -> MachineSpec {
        MachineSpec {
            accel,
            cpu_model: default_cpu_model(accel).into(),
            vcpus: 2,
            memory_mib: 512,
            kernel: "/img/vmlinuz".into(),
            initrd: "/img/initrd".into(),
            cmdline: "console=ttyS0 quiet".into(),
            disk: "/vm/disk,1.qcow2".into(),
            disk_node: "disk0".into(),
            mem_path: "/run/vm/mem".into(),
            qmp_socket: "/vm/qmp.sock".into(),
            agent_socket: "/vm/agent.sock".into(),
            console_log: "/vm/console.log".into(),
            pid_file: "/vm/qemu.pid".into(),
            forwards: vec![
                PortForward {
                    host: 40000,
                    guest: 8080,
                },
                PortForward {
                    host: 40001,
                    guest: 22,
                },
            ],
            tsc_khz: Some(2_599_998),
            extra_cmdline: vec!["hatch.disk_grow=1".into()],
            incoming: false,
            egress_tap: None,
        }
    }

    fn args(s: &MachineSpec) -> Vec<String> {
        s.args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    fn value_of(args: &[String], flag: &str) -> Vec<String> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].clone())
            .collect()
    }

    #[test]
    fn tcg_machine_has_file_backed_ram_and_tsc_hint() {
        let a = args(&spec(Accel::Tcg));
        assert_eq!(value_of(&a, "-M"), ["microvm,acpi=on,memory-backend=mem"]);
        assert_eq!(value_of(&a, "-accel"), ["tcg"]);
        assert_eq!(value_of(&a, "-cpu"), ["max"]);
        assert_eq!(value_of(&a, "-smp"), ["2"]);
        assert_eq!(value_of(&a, "-m"), ["512M"]);
        assert_eq!(
            value_of(&a, "-object"),
            ["memory-backend-file,id=mem,size=512M,mem-path=/run/vm/mem,share=on,align=2M"]
        );
        assert_eq!(
            value_of(&a, "-append"),
            ["console=ttyS0 quiet tsc_early_khz=2599998 hatch.disk_grow=1"]
        );
        assert!(a.contains(&"-daemonize".to_string()));
        assert!(a.contains(&"-no-reboot".to_string()));
        assert!(value_of(&a, "-incoming").is_empty());
    }

    #[test]
    fn a_restore_waits_for_its_incoming_state() {
        let mut s = spec(Accel::Tcg);
        s.incoming = true;
        assert_eq!(value_of(&args(&s), "-incoming"), ["defer"]);
    }

    #[test]
    fn kvm_uses_host_cpu_and_no_tsc_hint() {
        let a = args(&spec(Accel::Kvm));
        assert_eq!(value_of(&a, "-cpu"), ["host"]);
        let pinned = MachineSpec {
            cpu_model: "Haswell-v4,-hle".into(),
            ..spec(Accel::Kvm)
        };
        assert_eq!(value_of(&args(&pinned), "-cpu"), ["Haswell-v4,-hle"]);
        assert!(valid_cpu_model("Haswell-v4,-hle") && valid_cpu_model("max"));
        for bad in ["", "-x", "max ", "a;b", "host\n"] {
            assert!(!valid_cpu_model(bad), "{bad:?}");
        }
        assert_eq!(
            value_of(&a, "-append"),
            ["console=ttyS0 quiet hatch.disk_grow=1"]
        );
    }

    #[test]
    fn network_is_restricted_with_loopback_only_forwards() {
        let a = args(&spec(Accel::Tcg));
        assert_eq!(
            value_of(&a, "-netdev"),
            [
                "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:40000-:8080,hostfwd=tcp:127.0.0.1:40001-:22"
            ]
        );
        assert_eq!(value_of(&a, "-device")[1], "virtio-net-device,netdev=net0");
        let mut with_tap = spec(Accel::Tcg);
        with_tap.egress_tap = Some("hvabc".into());
        let a = args(&with_tap);
        assert_eq!(
            value_of(&a, "-netdev")[1],
            "tap,id=net1,ifname=hvabc,script=no,downscript=no"
        );
        assert!(
            value_of(&a, "-device")
                .contains(&"virtio-net-device,netdev=net1,mac=52:54:00:4e:45:54".to_string())
        );
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let a = args(&spec(Accel::Tcg));
        assert_eq!(
            value_of(&a, "-blockdev"),
            ["driver=qcow2,node-name=disk0,file.driver=file,file.filename=/vm/disk,,1.qcow2"]
        );
    }

    #[test]
    fn console_and_qmp_are_files_and_sockets_that_outlive_the_daemon() {
        let a = args(&spec(Accel::Tcg));
        assert_eq!(
            value_of(&a, "-chardev"),
            [
                "file,id=console,path=/vm/console.log,append=on",
                "socket,id=agent,path=/vm/agent.sock,server=on,wait=off"
            ]
        );
        assert!(
            value_of(&a, "-device")
                .contains(&"virtserialport,chardev=agent,name=org.hatch.agent".to_string())
        );
        assert_eq!(value_of(&a, "-serial"), ["chardev:console"]);
        assert_eq!(
            value_of(&a, "-qmp"),
            ["unix:/vm/qmp.sock,server=on,wait=off"]
        );
        assert_eq!(value_of(&a, "-pidfile"), ["/vm/qemu.pid"]);
    }
}
