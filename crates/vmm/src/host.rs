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

/// What identifies this host's CPU for a `-cpu host` guest: a hash of the
/// first processor's model name and feature flags. A snapshot taken under
/// `host` restores only where this is the same.
pub fn cpu_signature() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let wanted = |l: &&str| l.starts_with("model name") || l.starts_with("flags");
    let mut lines: Vec<&str> = cpuinfo
        .split("\n\n")
        .next()
        .unwrap_or_default()
        .lines()
        .filter(wanted)
        .collect();
    lines.sort_unstable();
    blake3::hash(lines.join("\n").as_bytes()).to_hex()[..16].to_string()
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

/// Free space in MiB on the file system holding `path` (e.g. the tmpfs a
/// checkpoint copies guest RAM into).
pub fn fs_free_mib(path: &std::path::Path) -> Option<u64> {
    statvfs(path).map(|st| st.f_bavail.saturating_mul(st.f_frsize) / (1024 * 1024))
}

/// Size in bytes of the file system holding `path`.
pub fn fs_size_bytes(path: &std::path::Path) -> Option<u64> {
    statvfs(path).map(|st| st.f_blocks.saturating_mul(st.f_frsize))
}

fn statvfs(path: &std::path::Path) -> Option<libc::statvfs> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a valid NUL-terminated string and `st` points to
    // writable memory of the right type, which statvfs fills on success.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialised `st`.
    Some(unsafe { st.assume_init() })
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
        assert!(fs_free_mib(std::path::Path::new("/")).unwrap() > 0);
        assert!(fs_size_bytes(std::path::Path::new("/")).unwrap() > 1 << 20);
        assert_eq!(fs_free_mib(std::path::Path::new("/no/such/dir")), None);
    }
}
