//! VMs' outbound network (docs/NETWORK.md). Each VM of `tap` mode gets a
//! second network card on a tap device of its own (`hv` + its id), a /30
//! of the VMs' range (host end .1, guest end .2), NAT out of the host, and
//! the firewall of [`firewall`]: the host, its loopback services and the
//! other VMs are refused, the rest is checked against the VM's egress
//! policy. The first card stays QEMU user-mode networking (restricted):
//! the proxy's way in, unchanged.
//!
//! `tap` needs root (CAP_NET_ADMIN), /dev/net/tun, `ip` and `nft`; where
//! they are missing (or `--network user`), VMs get `user` mode: inbound
//! only, no egress.

pub mod firewall;

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;

use crate::error::ApiError;
use crate::model::{Egress, NetworkMode, NetworkSettings};

/// The operator's choice (`--network`, `HATCH_NETWORK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Choice {
    /// `tap` where the host allows it, else `user`.
    #[default]
    Auto,
    Tap,
    User,
}

impl std::str::FromStr for Choice {
    type Err = String;
    fn from_str(s: &str) -> Result<Choice, String> {
        match s {
            "auto" => Ok(Choice::Auto),
            "tap" => Ok(Choice::Tap),
            "user" => Ok(Choice::User),
            other => Err(format!(
                "unknown network mode {other:?} (auto, tap or user)"
            )),
        }
    }
}

/// Addresses of VMs' outbound cards: /30s out of 10.200.0.0/16.
pub const VM_RANGE: &str = "10.200.0.0/16";

/// The host's side of VM networking.
pub struct Network {
    /// Err: user mode only (and why).
    tap: Result<TapHost, String>,
    /// The link of each VM whose QEMU runs here (for the guest's address
    /// after a restore), kept after it stops: its next run prefers the same
    /// /30.
    links: std::sync::Mutex<std::collections::HashMap<String, Link>>,
    /// The egress script last applied per VM: a wake whose policy is
    /// already in the table (it stays across suspends) runs no `nft`.
    applied: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

struct TapHost {
    /// This daemon's nftables table.
    table: String,
    range: Ipv4Net,
    /// The host's resolver, handed to guests (none if it is on loopback).
    dns: Option<Ipv4Addr>,
}

/// A VM's outbound link for one run of its QEMU.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    pub tap: String,
    pub host: Ipv4Net,
    pub guest: Ipv4Net,
    pub dns: Option<Ipv4Addr>,
}

/// How the guest's end of a link is addressed: its address and gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestAddressing {
    pub guest: Ipv4Net,
    pub gateway: Ipv4Addr,
}

impl Link {
    pub fn addressing(&self) -> GuestAddressing {
        GuestAddressing {
            guest: self.guest,
            gateway: self.host.addr(),
        }
    }

    /// Kernel parameters for the guest's init (a cold boot).
    pub fn kernel_params(&self) -> Vec<String> {
        let mut p = vec![format!("hatch.net={},{}", self.guest, self.host.addr())];
        if let Some(dns) = self.dns {
            p.push(format!("hatch.dns={dns}"));
        }
        p
    }
}

impl Network {
    /// Set the host up for `choice`: for tap, the firewall table (named
    /// after the daemon's data dir, so that daemons on one host keep their
    /// own) and IPv4 forwarding. Falls back to user mode under `Auto`.
    pub fn setup(choice: Choice, data_dir: &std::path::Path) -> anyhow::Result<Network> {
        if choice == Choice::User {
            return Ok(Network {
                tap: Err("--network user".into()),
                links: Default::default(),
                applied: Default::default(),
            });
        }
        let id = blake3::hash(data_dir.as_os_str().as_encoded_bytes()).to_hex();
        let table = format!("hatch_{}", &id[..10]);
        let range: Ipv4Net = VM_RANGE.parse()?;
        let tap = prepare_host(&table, range).map(|()| TapHost {
            table,
            range,
            dns: host_resolver(),
        });
        match (&tap, choice) {
            (Err(why), Choice::Tap) => {
                anyhow::bail!("--network tap: this host cannot give VMs tap networking: {why}")
            }
            (Err(why), _) => tracing::warn!(
                reason = %why,
                "VMs get user-mode networking (inbound only, no egress)"
            ),
            (Ok(t), _) => {
                tracing::info!(table = %t.table, range = %t.range, "VMs get tap networking with egress")
            }
        }
        Ok(Network {
            tap,
            links: Default::default(),
            applied: Default::default(),
        })
    }

    /// The network a new VM gets, with the egress asked for.
    pub fn settings_for(&self, egress: Option<Egress>) -> Result<NetworkSettings, ApiError> {
        match (&self.tap, egress) {
            (Ok(_), egress) => Ok(NetworkSettings {
                mode: NetworkMode::Tap,
                egress: egress.unwrap_or(Egress::Allow),
            }),
            (Err(_), None | Some(Egress::Deny)) => Ok(NetworkSettings {
                mode: NetworkMode::User,
                egress: Egress::Deny,
            }),
            (Err(why), Some(_)) => Err(ApiError::invalid(format!(
                "egress needs tap networking, which this host does not give VMs ({why})"
            ))),
        }
    }

    /// Prepare VM `vm_id`'s outbound link for a QEMU launch: a free /30,
    /// the tap's name (QEMU creates the tap), its egress policy in the
    /// firewall. None for `user` mode. `held`: the VM's own QEMU (a warm
    /// standby) still holds its last /30 on its tap, which is then the
    /// link.
    pub fn prepare(
        &self,
        vm_id: &str,
        settings: Option<&NetworkSettings>,
        held: bool,
    ) -> anyhow::Result<Option<Link>> {
        let Some(s) = settings.filter(|s| s.mode == NetworkMode::Tap) else {
            return Ok(None);
        };
        let host = self.tap.as_ref().map_err(|why| {
            anyhow::anyhow!("vm {vm_id} has tap networking, but this host cannot give it: {why}")
        })?;
        let tap = tap_name(vm_id);
        // The last run's /30 while no interface holds it (the guest keeps
        // the address it had) or while the VM's own QEMU does, else a free
        // one.
        let previous = self.link_of(vm_id).map(|l| (l.host, l.guest));
        let (host_net, guest_net) = match previous {
            Some((host_net, guest_net)) if held || address_free(host_net.addr()) => {
                (host_net, guest_net)
            }
            _ => free_subnet(host.range)?,
        };
        self.apply_policy(vm_id, &firewall::set_vm(&host.table, &tap, &s.egress))?;
        let link = Link {
            tap,
            host: host_net,
            guest: guest_net,
            dns: host.dns,
        };
        self.lock_links().insert(vm_id.to_string(), link.clone());
        Ok(Some(link))
    }

    fn lock_links(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Link>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run VM `vm_id`'s egress script unless it is the one last applied.
    fn apply_policy(&self, vm_id: &str, script: &str) -> anyhow::Result<()> {
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        if applied.get(vm_id).is_some_and(|s| s == script) {
            return Ok(());
        }
        applied.remove(vm_id);
        nft(script)?;
        applied.insert(vm_id.to_string(), script.to_string());
        Ok(())
    }

    /// The link VM `vm_id`'s running QEMU got.
    pub fn link_of(&self, vm_id: &str) -> Option<Link> {
        self.lock_links().get(vm_id).cloned()
    }

    /// A running VM found at start (its QEMU outlived the daemon): its
    /// egress policy again, and its link read off its tap.
    pub fn readopt(&self, vm_id: &str, settings: Option<&NetworkSettings>) -> anyhow::Result<()> {
        let Some(s) = settings.filter(|s| s.mode == NetworkMode::Tap) else {
            return Ok(());
        };
        let host = self.tap.as_ref().map_err(|why| anyhow::anyhow!("{why}"))?;
        let tap = tap_name(vm_id);
        self.apply_policy(vm_id, &firewall::set_vm(&host.table, &tap, &s.egress))?;
        let shown = output(Command::new("ip").args(["-4", "-o", "addr", "show", "dev", &tap]))?;
        let shown = String::from_utf8_lossy(&shown);
        let host_net: Ipv4Net = shown
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("tap {tap} has no IPv4 address"))?;
        let guest = Ipv4Net::new(Ipv4Addr::from(u32::from(host_net.addr()) + 1), 30)?;
        let link = Link {
            tap,
            host: host_net,
            guest,
            dns: host.dns,
        };
        self.lock_links().insert(vm_id.to_string(), link);
        Ok(())
    }

    /// Give the host's end of the tap QEMU created its MAC and address,
    /// and bring it up.
    pub fn configure(&self, link: &Link) -> anyhow::Result<()> {
        // One `ip` for all three (each process costs milliseconds of a wake).
        let tap = &link.tap;
        ip_batch(&format!(
            "link set dev {tap} address {}\naddr add {} dev {tap}\nlink set {tap} up\n",
            tap_mac(tap),
            link.host,
        ))
    }

    /// Forget a deleted VM's firewall rules (its tap went with its QEMU).
    pub fn forget(&self, vm_id: &str) {
        self.lock_links().remove(vm_id);
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(vm_id);
        if let Ok(host) = &self.tap {
            let _ = nft(&firewall::remove_vm(&host.table, &tap_name(vm_id)));
        }
    }
}

/// `hv` + the VM id's 12 random characters: 14 bytes, under the kernel's
/// 15-byte limit for interface names.
pub fn tap_name(vm_id: &str) -> String {
    let tail: String = vm_id
        .trim_start_matches("vm-")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(12)
        .collect();
    format!("{}{tail}", firewall::TAP_PREFIX)
}

/// The MAC of the host's end of tap `tap`: the same on every run of the
/// VM's QEMU. A restored guest keeps its neighbour entry for the gateway,
/// and the kernel trusts a REACHABLE entry for up to 45 s of the guest's
/// own time, which a snapshot stops: with the random MAC a new tap gets,
/// its first connections after a wake would go to a card that is gone.
/// Locally administered and unicast (first octet 0x02), so it collides
/// with no vendor's and not with the guest's 52:54:00:… card.
pub fn tap_mac(tap: &str) -> String {
    let h = blake3::hash(tap.as_bytes());
    let b = h.as_bytes();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], b[4]
    )
}

fn prepare_host(table: &str, range: Ipv4Net) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("the daemon does not run as root".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err("/dev/net/tun is missing".into());
    }
    ip(&["-V"]).map_err(|e| format!("`ip` does not run: {e}"))?;
    nft(&firewall::table(table, range)).map_err(|e| format!("installing the firewall: {e:#}"))?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .map_err(|e| format!("enabling IPv4 forwarding: {e}"))?;
    Ok(())
}

/// Whether no interface of this host holds `addr`: binding a socket to an
/// address works exactly when it is local (a syscall, where listing the
/// addresses costs an `ip` process).
fn address_free(addr: Ipv4Addr) -> bool {
    matches!(
        std::net::UdpSocket::bind((addr, 0)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable
    )
}

/// A /30 of `range` no interface of this host uses (other daemons on the
/// host pick from the same range): (host end, guest end).
fn free_subnet(range: Ipv4Net) -> anyhow::Result<(Ipv4Net, Ipv4Net)> {
    let blocks = 1u32 << (30 - u32::from(range.prefix_len()));
    let base = u32::from(range.network());
    for _ in 0..64 {
        let block = rand::random::<u32>() % blocks;
        // Skip block 0 (the range's network address).
        if block == 0 {
            continue;
        }
        let net = base + block * 4;
        let host = Ipv4Addr::from(net + 1);
        if !address_free(host) {
            continue;
        }
        return Ok((
            Ipv4Net::new(host, 30)?,
            Ipv4Net::new(Ipv4Addr::from(net + 2), 30)?,
        ));
    }
    anyhow::bail!("no free /30 in {range}")
}

/// The first nameserver of the host's resolv.conf that guests can reach
/// (not a loopback one: the firewall refuses the host).
fn host_resolver() -> Option<Ipv4Addr> {
    let conf = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    conf.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .find(|a| !a.is_loopback())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    output(Command::new("ip").args(args)).map(drop)
}

/// Run several `ip` commands in one process (`ip -batch -`).
fn ip_batch(commands: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("running ip: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(commands.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!("ip failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Run an nft script.
fn nft(script: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("running nft: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!(
            "nft failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<Vec<u8>> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| anyhow::anyhow!("running {:?}: {e}", cmd.get_program()))?;
    if !out.status.success() {
        anyhow::bail!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_and_come_from_the_id() {
        assert_eq!(tap_name("vm-abc123def456"), "hvabc123def456");
        assert!(tap_name("vm-abc123def456").len() <= 15);
        assert_eq!(tap_name("vm-a/b"), "hvab");
    }

    #[test]
    fn tap_macs_are_stable_unicast_and_locally_administered() {
        let mac = tap_mac("hvabc123def456");
        assert_eq!(mac, tap_mac("hvabc123def456"));
        assert_ne!(mac, tap_mac("hvabc123def457"));
        assert!(mac.starts_with("02:"), "{mac}");
        assert_eq!(mac.len(), 17, "{mac}");
    }

    #[test]
    fn links_hand_the_guest_its_address_gateway_and_resolver() {
        let link = Link {
            tap: "hvx".into(),
            host: "10.200.0.5/30".parse().unwrap(),
            guest: "10.200.0.6/30".parse().unwrap(),
            dns: Some(Ipv4Addr::new(192, 0, 2, 53)),
        };
        assert_eq!(
            link.kernel_params(),
            ["hatch.net=10.200.0.6/30,10.200.0.5", "hatch.dns=192.0.2.53"]
        );
    }
}
