//! `hatch.netprobe=ADDR:PORT[,ADDR:PORT...]` on the kernel command line makes the
//! guest try a TCP connection to each address once its app listens, and print
//! the outcome to the console. The isolation tests use it to prove that a
//! guest cannot reach the host's loopback services.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Addresses listed by `hatch.netprobe=` (invalid entries are reported).
pub fn targets(cmdline: &str) -> Vec<Result<SocketAddr, String>> {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("hatch.netprobe="))
        .flat_map(|list| list.split(','))
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| s.to_string()))
        .collect()
}

/// One line per target: `hatch-netprobe ADDR connected|refused|timeout|error:...`.
pub fn run(cmdline: &str) {
    for target in targets(cmdline) {
        let line = match target {
            Err(bad) => format!("hatch-netprobe {bad} invalid"),
            Ok(addr) => {
                let outcome = match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
                    Ok(_) => "connected".to_string(),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        "refused".to_string()
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => "timeout".to_string(),
                    Err(e) => format!("error:{}", e.kind()),
                };
                format!("hatch-netprobe {addr} {outcome}")
            }
        };
        eprintln!("{line}");
    }
    eprintln!("hatch-netprobe done");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        let t = targets("quiet hatch.netprobe=10.0.2.2:7070,10.0.2.15:8080,bad panic=-1");
        assert_eq!(t.len(), 3);
        assert_eq!(t[0], Ok("10.0.2.2:7070".parse().unwrap()));
        assert_eq!(t[2], Err("bad".to_string()));
        assert!(targets("quiet").is_empty());
    }
}
