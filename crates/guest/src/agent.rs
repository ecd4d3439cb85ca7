//! The guest side of Hatch's agent channel: a virtio-serial port named
//! `org.hatch.agent`. After a restore the host sends
//! `sync <unix seconds>.<nanoseconds> <64 hex digits>`; the agent sets the
//! wall clock (which stood still while the VM was suspended) and mixes the
//! seed into the kernel RNG and reseeds it (so restored copies of one
//! snapshot do not share random streams). A request may end with an id
//! (`sync <time> <seed> <id>`): the answer then repeats it and carries the
//! clock just set, `ok <id> <secs>.<nanos>` (or `error <id> <why>`), so the
//! host can tell answers to retried requests apart and check the clock.
//! Without an id the answer is `ok` or `error <why>`.
//!
//! The same port carries exec sessions (see `exec`).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

pub const PORT_NAME: &str = "org.hatch.agent";

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` = `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// The device node of the agent port, found through sysfs (no udev here).
fn find_port() -> Option<PathBuf> {
    let entries = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for e in entries.flatten() {
        let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if name.trim() == PORT_NAME {
            return Some(PathBuf::from("/dev").join(e.file_name()));
        }
    }
    None
}

/// Serve the agent port forever (in its own thread).
pub fn run() {
    let Some(port) = find_port() else {
        eprintln!("hatch-guest: no agent port; clock and RNG are not managed");
        return;
    };
    if let Err(e) = random() {
        eprintln!("hatch-guest: agent: {e} (tried again at each sync)");
    }
    loop {
        // A panic while serving must not end the agent: the next restore's
        // clock sync depends on it.
        match std::panic::catch_unwind(|| serve(&port)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("hatch-guest: agent: {e}"),
            Err(_) => eprintln!("hatch-guest: agent: panicked; serving again"),
        }
        // The port reads end-of-file while no host is connected (e.g.
        // during a daemon restart); wait for one.
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn serve(port: &PathBuf) -> std::io::Result<()> {
    let file = File::options().read(true).write(true).open(port)?;
    // Replies and exec output share the port: every line goes out whole
    // through `exec::send`.
    crate::exec::set_port(Some(file.try_clone()?));
    let result = (|| {
        for line in whole_lines(BufReader::new(file)) {
            let line = line?;
            if !crate::exec::handle(&line) && !crate::exec::send(&answer(&line)) {
                return Err(std::io::Error::other("the agent port closed"));
            }
        }
        Ok(())
    })();
    crate::exec::set_port(None);
    result
}

/// The lines read from `port`, each whole: a last line without its
/// newline (cut short by the host's hang-up) is not a request.
fn whole_lines(mut port: impl BufRead) -> impl Iterator<Item = std::io::Result<String>> {
    std::iter::from_fn(move || {
        let mut buf = Vec::new();
        match port.read_until(b'\n', &mut buf) {
            Ok(0) => None,
            Ok(_) => buf.strip_suffix(b"\n").map(|line| {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                Ok(String::from_utf8_lossy(line).into_owned())
            }),
            Err(e) => Some(Err(e)),
        }
    })
}

/// The reply line to a request line.
fn answer(line: &str) -> String {
    let id = line.split_whitespace().nth(3);
    match (handle(line), id) {
        (Ok(()), Some(id)) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            format!("ok {id} {}.{:09}\n", now.as_secs(), now.subsec_nanos())
        }
        (Ok(()), None) => "ok\n".to_string(),
        (Err(e), Some(id)) => format!("error {id} {e}\n"),
        (Err(e), None) => format!("error {e}\n"),
    }
}

fn handle(line: &str) -> Result<(), String> {
    let mut words = line.split_whitespace();
    match words.next() {
        Some("sync") => {
            let time = words.next().ok_or("missing time")?;
            let seed = words.next().ok_or("missing seed")?;
            if let Some(id) = words.next()
                && (id.len() > 20 || !id.bytes().all(|b| b.is_ascii_digit()))
            {
                return Err("bad request id".into());
            }
            set_clock(parse_time(time)?)?;
            reseed(&parse_hex(seed)?)
        }
        Some("net") => {
            let addr = words.next().ok_or("missing address")?;
            let gw = words.next().ok_or("missing gateway")?;
            set_network(addr, gw)
        }
        Some(other) => Err(format!("unknown command {other:?}")),
        None => Err("empty line".into()),
    }
}

/// The MAC address of the outbound card (`hatch_vmm::spec::EGRESS_MAC`).
const EGRESS_MAC: &str = "52:54:00:4e:45:54";

/// Re-address the outbound card (after a restore the host's end of it may
/// be another /30): `addr` in CIDR form, `gw` the host's end.
fn set_network(addr: &str, gw: &str) -> Result<(), String> {
    let valid = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b'/')
    };
    if !valid(addr) || !valid(gw) || !addr.contains('/') {
        return Err("bad address".into());
    }
    let card = std::fs::read_dir("/sys/class/net")
        .map_err(|e| e.to_string())?
        .flatten()
        .find(|e| {
            std::fs::read_to_string(e.path().join("address")).is_ok_and(|m| m.trim() == EGRESS_MAC)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .ok_or("no outbound card")?;
    // Usually a wake keeps the VM's /30: then nothing is run (a process
    // costs tens of milliseconds of the wake under emulation).
    if already_set(&card, addr, gw) {
        return Ok(());
    }
    // busybox's `ip` has no batch mode: one process per step.
    for args in [
        vec!["addr", "flush", "dev", &card],
        vec!["addr", "add", addr, "dev", &card],
        vec!["link", "set", &card, "up"],
        vec!["route", "replace", "default", "via", gw, "dev", &card],
    ] {
        let out = std::process::Command::new("ip")
            .args(&args)
            .output()
            .map_err(|e| format!("ip: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

/// Whether `card` already has address `addr` (CIDR) and the default route
/// goes through it via `gw`: the address is local exactly when a socket
/// can be bound to it, and the routes are in /proc/net/route.
fn already_set(card: &str, addr: &str, gw: &str) -> bool {
    let Some(ip) = addr
        .split('/')
        .next()
        .and_then(|a| a.parse::<std::net::Ipv4Addr>().ok())
    else {
        return false;
    };
    let Ok(gw) = gw.parse::<std::net::Ipv4Addr>() else {
        return false;
    };
    if std::net::UdpSocket::bind((ip, 0)).is_err() {
        return false;
    }
    let routes = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    default_route_via(&routes, card) == Some(gw)
}

/// The gateway of the default route through `card` in /proc/net/route
/// (addresses are little-endian hex).
fn default_route_via(routes: &str, card: &str) -> Option<std::net::Ipv4Addr> {
    routes.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 || f[0] != card || f[1] != "00000000" {
            return None;
        }
        let gw = u32::from_str_radix(f[2], 16).ok()?;
        Some(std::net::Ipv4Addr::from(gw.swap_bytes()))
    })
}

fn parse_time(s: &str) -> Result<(i64, i64), String> {
    let (secs, nanos) = s.split_once('.').unwrap_or((s, "0"));
    let secs: i64 = secs.parse().map_err(|_| format!("bad time {s:?}"))?;
    let nanos: i64 = nanos.parse().map_err(|_| format!("bad time {s:?}"))?;
    if !(0..1_000_000_000).contains(&nanos) {
        return Err(format!("bad nanoseconds in {s:?}"));
    }
    Ok((secs, nanos))
}

fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) || s.len() > 512 {
        return Err("bad seed length".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| "bad seed hex".to_string()))
        .collect()
}

fn set_clock((secs, nanos): (i64, i64)) -> Result<(), String> {
    let ts = libc::timespec {
        tv_sec: secs,
        tv_nsec: nanos,
    };
    // SAFETY: `ts` is a valid timespec on the stack for the call's duration.
    let rc = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    if rc != 0 {
        return Err(format!(
            "clock_settime: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// `/dev/random`, opened once (at start, by `run`): opening it after a
/// restore cost 13-15 ms of the guest's time under emulation (cold code
/// paths), the two ioctls ~1.5 ms.
fn random() -> Result<&'static File, String> {
    static RANDOM: OnceLock<File> = OnceLock::new();
    if let Some(f) = RANDOM.get() {
        return Ok(f);
    }
    let f = File::options()
        .write(true)
        .open("/dev/random")
        .map_err(|e| format!("/dev/random: {e}"))?;
    Ok(RANDOM.get_or_init(|| f))
}

fn reseed(seed: &[u8]) -> Result<(), String> {
    let random = random()?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info: Vec<u8> = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    info.extend_from_slice(seed);
    // SAFETY: `info` is laid out as struct rand_pool_info with `buf_size`
    // bytes of buffer following the header, and outlives the call.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if rc != 0 {
        return Err(format!(
            "RNDADDENTROPY: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) };
    if rc != 0 {
        return Err(format!(
            "RNDRESEEDCRNG: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_line_cut_short_is_not_a_request() {
        let port = std::io::Cursor::new("sync 1.0 ab 7\nexec 3 e30=\r\nkill 3 1");
        let lines: Vec<String> = super::whole_lines(port).map(Result::unwrap).collect();
        assert_eq!(lines, ["sync 1.0 ab 7", "exec 3 e30="]);
    }

    #[test]
    fn the_default_route_is_read_from_proc() {
        let routes = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
                      eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\n\
                      eth1\t00000000\t0100C80A\t0003\t0\t0\t0\t00000000\n";
        assert_eq!(
            default_route_via(routes, "eth1"),
            Some("10.200.0.1".parse().unwrap())
        );
        assert_eq!(default_route_via(routes, "eth0"), None);
        assert_eq!(default_route_via("Iface\n", "eth1"), None);
    }

    use super::*;

    #[test]
    fn parses_sync_arguments() {
        assert_eq!(parse_time("1700000000.000000500"), Ok((1_700_000_000, 500)));
        assert_eq!(parse_time("12"), Ok((12, 0)));
        assert!(parse_time("x.1").is_err());
        assert!(parse_time("1.1000000000").is_err());
        assert_eq!(parse_hex("00ff10"), Ok(vec![0, 255, 16]));
        assert!(parse_hex("abc").is_err());
        assert!(handle("dance").is_err());
        assert_eq!(answer("dance"), "error unknown command \"dance\"\n");
        assert!(answer("sync 1.0 00 7x").starts_with("error 7x bad request id"));
    }
}
