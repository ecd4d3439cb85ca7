//! The HTTP endpoints of the demo application.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tiny_http::{Header, Method, Request, Response, Server};

use crate::Config;

/// Shared state of all worker threads.
struct App {
    counter: AtomicU64,
    kv_dir: PathBuf,
    data_dir: PathBuf,
    require_mount: bool,
    /// Sequence for unique temporary file names.
    tmp_seq: AtomicU64,
    /// The kernel's boot id, read once: it is fixed for the kernel's life
    /// (a restore keeps it), and opening a /proc file is the slowest part
    /// of the first request after a restore under emulation (cold code).
    boot_id: String,
}

fn read_boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

/// Seconds since boot, suspended time included, as `/proc/uptime`'s first
/// field gives it (two decimals), without opening a file.
fn uptime() -> String {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return "0".to_string();
    }
    format!("{}.{:02}", ts.tv_sec, ts.tv_nsec / 10_000_000)
}

/// A response: status and body (always `text/plain`).
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    fn ok(body: impl Into<Vec<u8>>) -> Self {
        Reply {
            status: 200,
            body: body.into(),
        }
    }
    fn err(status: u16, code: &str) -> Self {
        Reply {
            status,
            body: format!("{code}\n").into_bytes(),
        }
    }
}

/// Connections the kernel queues until the app accepts them. The standard
/// library's 128 is less than a burst that an auto-wake releases at once
/// (the proxy holds every request until the guest runs, then forwards them
/// all); past the queue's end the guest drops handshakes, and user-mode
/// networking retries those slowly.
const LISTEN_BACKLOG: i32 = 1024;

fn listen(port: u16) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&std::net::SocketAddr::from(([0, 0, 0, 0], port)).into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Binds the listener, calls `on_listening`, and answers requests on `cfg.threads`
/// worker threads until the server fails.
pub fn serve(cfg: &Config, on_listening: impl FnOnce()) -> Result<(), String> {
    let addr = format!("0.0.0.0:{}", cfg.port);
    let server = listen(cfg.port)
        .and_then(|l| Server::from_listener(l, None).map_err(std::io::Error::other))
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let server = Arc::new(server);
    let app = Arc::new(App {
        counter: AtomicU64::new(0),
        kv_dir: cfg.data_dir.join("kv"),
        data_dir: cfg.data_dir.clone(),
        require_mount: cfg.require_mount,
        tmp_seq: AtomicU64::new(0),
        boot_id: read_boot_id(),
    });
    eprintln!(
        "hatch-guest: listening on {addr} ({} workers, data in {}, uptime {}s)",
        cfg.threads,
        app.kv_dir.display(),
        uptime()
    );
    on_listening();
    let mut workers = Vec::with_capacity(cfg.threads);
    for i in 0..cfg.threads {
        let server = Arc::clone(&server);
        let app = Arc::clone(&app);
        let handle = std::thread::Builder::new()
            .name(format!("http-{i}"))
            .spawn(move || worker(&server, &app))
            .map_err(|e| format!("cannot spawn worker thread: {e}"))?;
        workers.push(handle);
    }
    for w in workers {
        if w.join().is_err() {
            return Err("a worker thread panicked".to_string());
        }
    }
    Err("all workers stopped".to_string())
}

fn worker(server: &Server, app: &App) {
    loop {
        let req = match server.recv() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("hatch-guest: accept error: {e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        respond(req, app);
    }
}

fn respond(req: Request, app: &App) {
    if req.url() == "/ws" && *req.method() == Method::Get {
        crate::ws::upgrade(req);
        return;
    }
    // HEAD is fine for the read-only endpoints; anything that changes state needs GET.
    let path = req.url().split('?').next().unwrap_or_default();
    let read_only = matches!(path, "/" | "/disk/read");
    let reply = match req.method() {
        Method::Get => app.handle(req.url()),
        Method::Head if read_only => app.handle(req.url()),
        _ => Reply::err(405, "method_not_allowed"),
    };
    let mut resp = Response::from_data(reply.body).with_status_code(reply.status);
    if let Ok(h) = Header::from_bytes(&b"Content-Type"[..], &b"text/plain; charset=utf-8"[..]) {
        resp.add_header(h);
    }
    if let Ok(h) = Header::from_bytes(&b"Cache-Control"[..], &b"no-store"[..]) {
        resp.add_header(h);
    }
    if let Err(e) = req.respond(resp) {
        // The client went away; nothing else to do.
        if e.kind() != io::ErrorKind::BrokenPipe && e.kind() != io::ErrorKind::ConnectionReset {
            eprintln!("hatch-guest: write error: {e}");
        }
    }
}

impl App {
    fn handle(&self, url: &str) -> Reply {
        let (path, query) = url.split_once('?').unwrap_or((url, ""));
        match path {
            "/" => self.info(),
            "/counter" => {
                let n = self.counter.fetch_add(1, Ordering::SeqCst) + 1;
                Reply::ok(format!("counter={n}\n"))
            }
            "/disk/write" => self.disk_write(query),
            "/disk/read" => self.disk_read(query),
            _ => Reply::err(404, "not_found"),
        }
    }

    fn info(&self) -> Reply {
        let (boot_id, uptime) = (&self.boot_id, uptime());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Reply::ok(format!(
            "boot_id={boot_id}\nuptime={uptime}\ntime={}.{:03}\n",
            now.as_secs(),
            now.subsec_millis()
        ))
    }

    /// Checks that the persistent disk is there (so writes never land in the initramfs).
    fn disk_ready(&self) -> Result<(), Reply> {
        if !self.require_mount || is_mount_point(&self.data_dir) {
            Ok(())
        } else {
            Err(Reply::err(503, "disk_unavailable"))
        }
    }

    fn disk_write(&self, query: &str) -> Reply {
        let params = parse_query(query);
        let name = match param_name(&params) {
            Ok(n) => n,
            Err(r) => return r,
        };
        let Some(value) = param(&params, "value") else {
            return Reply::err(400, "missing_value");
        };
        if let Err(r) = self.disk_ready() {
            return r;
        }
        match self.write_durably(&name, value) {
            Ok(()) => Reply::ok("ok\n"),
            Err(e) => {
                eprintln!("hatch-guest: disk write {name}: {e}");
                Reply::err(500, "io_error")
            }
        }
    }

    fn disk_read(&self, query: &str) -> Reply {
        let params = parse_query(query);
        let name = match param_name(&params) {
            Ok(n) => n,
            Err(r) => return r,
        };
        if let Err(r) = self.disk_ready() {
            return r;
        }
        match fs::read(self.kv_dir.join(&name)) {
            Ok(v) => {
                let mut body = b"value=".to_vec();
                body.extend_from_slice(&v);
                body.push(b'\n');
                Reply::ok(body)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Reply::err(404, "not_found"),
            Err(e) => {
                eprintln!("hatch-guest: disk read {name}: {e}");
                Reply::err(500, "io_error")
            }
        }
    }

    /// Writes `value` to `kv/name` atomically (temporary file, fsync, rename, fsync of the
    /// directory), so a crash or snapshot sees either the old or the new value.
    fn write_durably(&self, name: &str, value: &[u8]) -> io::Result<()> {
        fs::create_dir_all(&self.kv_dir)?;
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        // Valid names never start with '.', so temporary names cannot collide with them.
        let tmp = self
            .kv_dir
            .join(format!(".tmp-{}-{seq}", std::process::id()));
        let result = (|| {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(value)?;
            f.sync_all()?;
            fs::rename(&tmp, self.kv_dir.join(name))?;
            File::open(&self.kv_dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

/// True when `dir` is on a different device than its parent (a mount point).
fn is_mount_point(dir: &Path) -> bool {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    match (fs::metadata(dir), fs::metadata(parent)) {
        (Ok(d), Ok(p)) => d.dev() != p.dev() || d.ino() == p.ino(),
        _ => false,
    }
}

fn param<'a>(params: &'a [(String, Vec<u8>)], key: &str) -> Option<&'a [u8]> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_slice())
}

fn param_name(params: &[(String, Vec<u8>)]) -> Result<String, Reply> {
    let Some(raw) = param(params, "name") else {
        return Err(Reply::err(400, "missing_name"));
    };
    match std::str::from_utf8(raw) {
        Ok(n) if valid_key_name(n) => Ok(n.to_string()),
        _ => Err(Reply::err(400, "invalid_name")),
    }
}

/// 1-64 characters of `[A-Za-z0-9._-]`, not starting with '.'.
pub fn valid_key_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Splits a query string into decoded `(key, value)` pairs (first occurrence wins on lookup).
pub fn parse_query(query: &str) -> Vec<(String, Vec<u8>)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (
                String::from_utf8_lossy(&url_decode(k)).into_owned(),
                url_decode(v),
            )
        })
        .collect()
}

/// Decodes `%XX` escapes and `+` (space) of a query component; malformed escapes stay as is.
pub fn url_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    out
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(dir: &Path) -> App {
        App {
            counter: AtomicU64::new(0),
            kv_dir: dir.join("kv"),
            data_dir: dir.to_path_buf(),
            require_mount: false,
            tmp_seq: AtomicU64::new(0),
            boot_id: read_boot_id(),
        }
    }

    #[test]
    fn uptime_is_what_proc_uptime_says() {
        let ours = uptime();
        let (_, decimals) = ours.split_once('.').unwrap();
        assert_eq!(decimals.len(), 2, "{ours}");
        let proc: f64 = fs::read_to_string("/proc/uptime")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let ours: f64 = ours.parse().unwrap();
        assert!((ours - proc).abs() < 1.0, "{ours} vs {proc}");
    }

    #[test]
    fn info_reports_the_boot_id_it_read_at_start() {
        let body = app(Path::new("/nonexistent")).handle("/").body;
        let body = String::from_utf8(body).unwrap();
        let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
        assert!(
            body.starts_with(&format!("boot_id={}\nuptime=", boot_id.trim())),
            "{body}"
        );
    }

    #[test]
    fn decoding() {
        assert_eq!(url_decode("a%20b+c"), b"a b c");
        assert_eq!(url_decode("%zz%4"), b"%zz%4");
        assert_eq!(url_decode("%41%4a"), b"AJ");
        assert_eq!(url_decode("100%"), b"100%");
        assert_eq!(url_decode("%e2%82%ac"), "€".as_bytes());
    }

    #[test]
    fn names() {
        assert!(valid_key_name("a"));
        assert!(valid_key_name("A.b_c-9"));
        assert!(valid_key_name(&"x".repeat(64)));
        assert!(!valid_key_name(&"x".repeat(65)));
        assert!(!valid_key_name(""));
        assert!(!valid_key_name(".hidden"));
        assert!(!valid_key_name("a/b"));
        assert!(!valid_key_name(".."));
        assert!(!valid_key_name("a b"));
    }

    #[test]
    fn endpoints() {
        let dir = std::env::temp_dir().join(format!("hatch-guest-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let a = app(&dir);
        assert_eq!(a.handle("/counter").body, b"counter=1\n");
        assert_eq!(a.handle("/counter").body, b"counter=2\n");
        assert_eq!(a.handle("/nope").status, 404);
        assert_eq!(a.handle("/disk/read?name=k").status, 404);
        assert_eq!(a.handle("/disk/write?name=.k&value=1").status, 400);
        assert_eq!(a.handle("/disk/write?name=k").status, 400);
        assert_eq!(a.handle("/disk/read?name=a%2Fb").status, 400);
        assert_eq!(
            a.handle("/disk/write?name=k&value=hello%20world").body,
            b"ok\n"
        );
        let r = a.handle("/disk/read?name=k");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"value=hello world\n");
        let info = String::from_utf8(a.handle("/").body).unwrap();
        let keys: Vec<&str> = info.lines().map(|l| l.split_once('=').unwrap().0).collect();
        assert_eq!(keys, ["boot_id", "uptime", "time"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn concurrent_counter_is_consecutive() {
        let a = Arc::new(app(Path::new("/nonexistent")));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let a = Arc::clone(&a);
                std::thread::spawn(move || {
                    (0..100)
                        .map(|_| {
                            let body = String::from_utf8(a.handle("/counter").body).unwrap();
                            body.trim()
                                .trim_start_matches("counter=")
                                .parse::<u64>()
                                .unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<u64> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        all.sort_unstable();
        assert_eq!(all, (1..=800).collect::<Vec<_>>());
    }
}
