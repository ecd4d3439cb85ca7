//! `hatch-guest`: the demo HTTP application and small guest agent of Hatch's default image.
//!
//! It runs inside the microVM (started by the initramfs `/init`), listens on
//! `0.0.0.0:8080` and serves:
//!
//! - `GET /`: `boot_id=<uuid>\nuptime=<seconds>\ntime=<unix seconds>\n`
//! - `GET /counter`: increments an in-memory counter, `counter=N\n`
//! - `GET /disk/write?name=N&value=V`: writes V to `<data>/kv/N` durably, `ok\n`
//! - `GET /disk/read?name=N`: `value=V\n`, or 404 `not_found\n`
//!
//! As a guest agent it grows the data filesystem online to the size of its block device
//! when the kernel command line contains `hatch.disk_grow=1`, and probes TCP
//! reachability of the addresses in `hatch.netprobe=` (see `netprobe`).
//!
//! It must be linked statically (the initramfs has no libc):
//! `RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p hatch-guest
//! --target x86_64-unknown-linux-gnu`.

mod agent;
mod app;
mod exec;
mod grow;
mod http;
mod netprobe;
mod touch;
mod ws;

use std::path::PathBuf;
use std::process::ExitCode;

/// Runtime configuration, from arguments and environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// TCP port to listen on (all addresses).
    pub port: u16,
    /// Number of worker threads answering requests.
    pub threads: usize,
    /// Root of the persistent disk; key/value files live in `<data_dir>/kv`.
    pub data_dir: PathBuf,
    /// Whether `data_dir` must be a mount point before disk requests are served
    /// (true for the default `/mnt/disk`, false when a directory is given explicitly).
    pub require_mount: bool,
    /// Whether to run the agent tasks (disk grow) requested on the kernel command line.
    pub agent: bool,
}

const DEFAULT_PORT: u16 = 8080;
const DEFAULT_THREADS: usize = 8;
const DEFAULT_DATA_DIR: &str = "/mnt/disk";

const USAGE: &str = "usage: hatch-guest [--port N | N] [--threads N] [--data-dir DIR] [--no-agent]\n\
environment: HATCH_GUEST_PORT, HATCH_GUEST_THREADS, HATCH_GUEST_DATA_DIR";

fn parse_config() -> Result<Config, String> {
    let mut cfg = Config {
        port: DEFAULT_PORT,
        threads: DEFAULT_THREADS,
        data_dir: PathBuf::from(DEFAULT_DATA_DIR),
        require_mount: true,
        agent: true,
    };
    if let Ok(p) = std::env::var("HATCH_GUEST_PORT") {
        cfg.port = parse_num(&p, "HATCH_GUEST_PORT")?;
    }
    if let Ok(t) = std::env::var("HATCH_GUEST_THREADS") {
        cfg.threads = parse_num(&t, "HATCH_GUEST_THREADS")?;
    }
    if let Some(d) = std::env::var_os("HATCH_GUEST_DATA_DIR") {
        cfg.data_dir = PathBuf::from(d);
        cfg.require_mount = false;
    }
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| args.next().ok_or_else(|| format!("{flag} needs a value"));
        match arg.as_str() {
            "--port" | "-p" => cfg.port = parse_num(&value("--port")?, "--port")?,
            "--threads" => cfg.threads = parse_num(&value("--threads")?, "--threads")?,
            "--data-dir" => {
                cfg.data_dir = PathBuf::from(value("--data-dir")?);
                cfg.require_mount = false;
            }
            "--no-agent" => cfg.agent = false,
            "--help" | "-h" => return Err(USAGE.to_string()),
            other if !other.starts_with('-') => cfg.port = parse_num(other, "port")?,
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if cfg.threads == 0 {
        return Err("--threads must be at least 1".to_string());
    }
    Ok(cfg)
}

fn parse_num<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("invalid value {s:?} for {what}"))
}

fn main() -> ExitCode {
    // App mode (PID 1 of an imported container image): see `app`.
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, root] = args.as_slice()
        && flag == "--app"
    {
        app::run(std::path::Path::new(root));
    }
    let cfg = match parse_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hatch-guest: {e}");
            return ExitCode::from(2);
        }
    };
    if cfg.agent {
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        if grow::cmdline_flag(&cmdline, "hatch.disk_grow") {
            let dir = cfg.data_dir.clone();
            // Grow in the background: HTTP must not wait for a large resize.
            let spawned = std::thread::Builder::new()
                .name("disk-grow".into())
                .spawn(move || match grow::grow_fs(&dir) {
                    Ok(msg) => eprintln!("hatch-guest: disk grow: {msg}"),
                    Err(e) => eprintln!("hatch-guest: disk grow failed: {e}"),
                });
            if let Err(e) = spawned {
                eprintln!("hatch-guest: cannot start disk grow thread: {e}");
            }
        }
    }
    if cfg.agent {
        let spawned = std::thread::Builder::new()
            .name("agent".into())
            .spawn(agent::run);
        if let Err(e) = spawned {
            eprintln!("hatch-guest: cannot start the agent thread: {e}");
        }
    }
    if cfg.agent {
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        if let Some(mib) = touch::requested(&cmdline) {
            let spawned = std::thread::Builder::new()
                .name("touch".into())
                .spawn(move || touch::touch(mib));
            if let Err(e) = spawned {
                eprintln!("hatch-guest: cannot start the touch thread: {e}");
            }
        }
    }
    let agent = cfg.agent;
    // Probe once the listener is up, so that the guest's own port can serve
    // as a positive control.
    let on_listening = move || {
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        if !agent || netprobe::targets(&cmdline).is_empty() {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("netprobe".into())
            .spawn(move || netprobe::run(&cmdline));
        if let Err(e) = spawned {
            eprintln!("hatch-guest: cannot start netprobe thread: {e}");
        }
    };
    match http::serve(&cfg, on_listening) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hatch-guest: {e}");
            ExitCode::FAILURE
        }
    }
}
