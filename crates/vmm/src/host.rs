//! Facts about the host that a launch depends on.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};

/// The host's TSC frequency in kHz. Under TCG the guest reads the host TSC, and
/// passing this as `tsc_early_khz` avoids a PIT calibration that can hang.
pub fn tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    tsc_khz_from(&cpuinfo)
}

fn tsc_khz_from(cpuinfo: &str) -> Option<u64> {
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0).round() as u64)
}

/// Number of CPUs usable by this process.
pub fn cpu_count() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// Total host memory in MiB.
pub fn memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024)
}

/// A TCP port on 127.0.0.1 that is free right now. Another process may take it
/// before QEMU binds it; the caller retries the launch in that rare case.
pub fn free_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tsc_from_cpuinfo() {
        let info = "processor\t: 0\ncpu MHz\t\t: 2599.998\ncache size\t: 1 KB\n";
        assert_eq!(tsc_khz_from(info), Some(2_599_998));
        assert_eq!(tsc_khz_from("processor : 0\n"), None);
    }

    #[test]
    fn host_facts_are_plausible() {
        assert!(cpu_count() >= 1);
        assert!(memory_mib().unwrap() > 0);
        assert_ne!(free_port().unwrap(), 0);
    }
}
