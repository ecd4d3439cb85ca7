//! Exec sessions over the agent port: the host runs commands in the VM
//! (`hatch vm exec`, `POST /vms/{id}/exec`) and copies files in and out
//! (`hatch vm cp`). Several sessions share the one port, each named by a
//! channel number the host picks. Lines, with data in base64:
//!
//! host to guest: `exec <ch> <json>` (a [`Start`]), `in <ch> <data>`,
//! `eof <ch>`, `resize <ch> <rows> <cols>`, `kill <ch> <signal>`;
//! guest to host: `out <ch> <data>`, `err <ch> <data>`,
//! `exit <ch> <code> <signal>` (the last line of a session), and
//! `fail <ch> <why>` for a session that could not start.
//!
//! Commands run where the app runs: in an imported image, chrooted into its
//! root with its environment, working dir and user (as `docker exec` does);
//! in the default image, as root in `/`.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Bytes read from a command's output per line sent.
const CHUNK: usize = 16 << 10;

/// Where and as whom commands run.
#[derive(Debug, Clone)]
pub struct Context {
    /// The root file system (chrooted into unless it is `/`).
    pub root: PathBuf,
    /// `KEY=VALUE` pairs every command gets (PATH and HOME included).
    pub env: Vec<(String, String)>,
    pub working_dir: String,
    pub uid: u32,
    pub gid: u32,
}

impl Default for Context {
    fn default() -> Self {
        Context {
            root: PathBuf::from("/"),
            env: vec![
                ("PATH".into(), DEFAULT_PATH.into()),
                ("HOME".into(), "/root".into()),
            ],
            working_dir: "/".into(),
            uid: 0,
            gid: 0,
        }
    }
}

static CONTEXT: OnceLock<Context> = OnceLock::new();

/// Set once by app mode, before the agent starts.
pub fn set_context(ctx: Context) {
    let _ = CONTEXT.set(ctx);
}

fn context() -> &'static Context {
    CONTEXT.get_or_init(Context::default)
}

impl Context {
    /// A command for `argv` set up to run in this context: chrooted, in
    /// `cwd` (or the working dir), as the user, with the context's
    /// environment plus `env`. The child gets its own session (so that a
    /// kill reaches what it started) and, with `tty`, its stdin as the
    /// controlling terminal.
    pub fn command(
        &self,
        argv: &[String],
        env: &BTreeMap<String, String>,
        cwd: Option<&str>,
        tty: bool,
    ) -> std::io::Result<Command> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| std::io::Error::other("empty command"))?;
        let mut cmd = Command::new(program);
        cmd.args(args).env_clear();
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.envs(env);
        let root = (self.root.as_path() != std::path::Path::new("/"))
            .then(|| CString::new(self.root.as_os_str().as_encoded_bytes()))
            .transpose()?;
        let dir = CString::new(cwd.unwrap_or(&self.working_dir))?;
        let (uid, gid) = (self.uid, self.gid);
        // SAFETY: between fork and exec only async-signal-safe calls
        // (chroot, chdir, setsid, ioctl, setgroups, setgid, setuid) on data
        // prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(root) = &root
                    && libc::chroot(root.as_ptr()) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::chdir(dir.as_ptr()) != 0 || libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }
}

/// What a session does, from its `exec` line.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Start {
    Run {
        cmd: Vec<String>,
        #[serde(default)]
        env: BTreeMap<String, String>,
        #[serde(default)]
        cwd: Option<String>,
        #[serde(default)]
        tty: bool,
        #[serde(default)]
        rows: u16,
        #[serde(default)]
        cols: u16,
    },
    /// Send a file's bytes as output.
    Read { path: String },
    /// Write the session's input to a file (created or truncated).
    Write {
        path: String,
        #[serde(default = "default_mode")]
        mode: u32,
    },
}

fn default_mode() -> u32 {
    0o644
}

/// A session in progress.
struct Session {
    /// Where `in` lines go: to the session's writer thread, which writes
    /// the command's stdin, its pty, or the file being written (so that a
    /// command not reading its input stalls only its own session, never
    /// the agent). None after `eof`.
    input: Option<mpsc::Sender<Vec<u8>>>,
    /// The command's process (its session leader); 0 for file copies.
    pid: i32,
    /// The pty master of a `tty` command (for `resize`).
    pty: Option<File>,
}

static SESSIONS: Mutex<Option<HashMap<u64, Session>>> = Mutex::new(None);
/// The host's end: replaced when the host connects again.
static PORT: Mutex<Option<File>> = Mutex::new(None);

fn sessions() -> MutexGuard<'static, Option<HashMap<u64, Session>>> {
    SESSIONS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Send one line to the host (whole, under the lock). False when no host.
pub fn send(line: &str) -> bool {
    let mut port = PORT.lock().unwrap_or_else(|p| p.into_inner());
    match port.as_mut() {
        Some(f) => f.write_all(line.as_bytes()).is_ok(),
        None => false,
    }
}

/// A host connected (`Some`) or left (`None`). Sessions do not outlive
/// the connection that started them: their commands are killed.
pub fn set_port(port: Option<File>) {
    *PORT.lock().unwrap_or_else(|p| p.into_inner()) = port;
    let gone: Vec<Session> = sessions()
        .get_or_insert_with(HashMap::new)
        .drain()
        .map(|(_, s)| s)
        .collect();
    for s in gone {
        if s.pid > 0 {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(-s.pid, libc::SIGKILL) };
        }
    }
}

/// Whether `line` belongs to exec (then it is handled here).
pub fn handle(line: &str) -> bool {
    let mut words = line.split_whitespace();
    let verb = words.next().unwrap_or("");
    if !matches!(verb, "exec" | "in" | "eof" | "resize" | "kill") {
        return false;
    }
    let Some(ch) = words.next().and_then(|c| c.parse::<u64>().ok()) else {
        eprintln!("hatch-guest: exec: bad line {verb:?}");
        return true;
    };
    let rest: Vec<&str> = words.collect();
    let result = match verb {
        "exec" => start(ch, rest.first().copied().unwrap_or("")),
        "in" => input(ch, &rest),
        "eof" => eof(ch),
        "resize" => resize(ch, &rest),
        _ => kill(ch, &rest),
    };
    if let Err(why) = result {
        fail(ch, &why);
    }
    true
}

fn fail(ch: u64, why: &str) {
    let why = why.replace(['\n', '\r'], " ");
    send(&format!("fail {ch} {why}\n"));
}

fn start(ch: u64, json: &str) -> Result<(), String> {
    let bytes = B64.decode(json).map_err(|e| format!("bad request: {e}"))?;
    let start: Start = serde_json::from_slice(&bytes).map_err(|e| format!("bad request: {e}"))?;
    if sessions().as_ref().is_some_and(|s| s.contains_key(&ch)) {
        return Err(format!("channel {ch} is in use"));
    }
    match start {
        Start::Run {
            cmd,
            env,
            cwd,
            tty,
            rows,
            cols,
        } => run(ch, &cmd, &env, cwd.as_deref(), tty.then_some((rows, cols))),
        Start::Read { path } => {
            let file = open_in_root(&path, libc::O_RDONLY, 0)?;
            insert(ch, None, 0, None);
            spawn_named("exec-read", move || {
                let ok = pump(ch, "out", file);
                finish(ch, if ok { 0 } else { 1 }, 0);
            })
        }
        Start::Write { path, mode } => {
            let file = open_in_root(
                &path,
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
                mode & 0o7777,
            )?;
            let input = writer(ch, file, 0)?;
            insert(ch, Some(input), 0, None);
            Ok(())
        }
    }
}

fn insert(ch: u64, input: Option<mpsc::Sender<Vec<u8>>>, pid: i32, pty: Option<File>) {
    sessions()
        .get_or_insert_with(HashMap::new)
        .insert(ch, Session { input, pid, pty });
}

fn exists(ch: u64) -> bool {
    sessions().as_ref().is_some_and(|s| s.contains_key(&ch))
}

/// End a session that went wrong: its command killed, the host told why.
fn abort(ch: u64, why: &str) {
    let gone = sessions().as_mut().and_then(|s| s.remove(&ch));
    if let Some(s) = gone {
        if s.pid > 0 {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(-s.pid, libc::SIGKILL) };
        }
        fail(ch, why);
    }
}

/// The session's input writer: a thread writing what `in` lines bring to
/// `file`, until `eof` (the sender dropped). A file copy (`pid` 0) is
/// synced and the session ends there.
fn writer(ch: u64, mut file: File, pid: i32) -> Result<mpsc::Sender<Vec<u8>>, String> {
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    spawn_named("exec-in", move || {
        for data in rx {
            if let Err(e) = file.write_all(&data) {
                if pid > 0 && e.raw_os_error() == Some(libc::EPIPE) {
                    return; // the command closed its stdin: the rest is dropped
                }
                abort(ch, &format!("writing input: {e}"));
                return;
            }
        }
        if pid == 0 && exists(ch) {
            match file.sync_all() {
                Ok(()) => finish(ch, 0, 0),
                Err(e) => abort(ch, &format!("syncing the file: {e}")),
            }
        }
    })?;
    Ok(tx)
}

/// Open `path` as the commands see it: resolved inside the context's root
/// (`openat2` with `RESOLVE_IN_ROOT`, so that absolute symlinks in the
/// image point into it).
fn open_in_root(path: &str, flags: i32, mode: u32) -> Result<File, String> {
    let root = File::open(&context().root).map_err(|e| format!("the root: {e}"))?;
    let cpath = CString::new(path).map_err(|_| "the path holds a NUL byte".to_string())?;
    // The kernel's `struct open_how` (libc's is non-exhaustive).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    // O_NONBLOCK: opening a FIFO must not block the agent.
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC | libc::O_NONBLOCK) as u64,
        mode: mode as u64,
        resolve: libc::RESOLVE_IN_ROOT,
    };
    // SAFETY: `cpath` and `how` outlive the call; the size passed is `how`'s.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            cpath.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(format!("{path}: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd as i32) };
    // Copies are of regular files only (not devices, FIFOs, directories).
    let meta = file.metadata().map_err(|e| format!("{path}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{path}: not a regular file"));
    }
    Ok(file)
}

fn run(
    ch: u64,
    argv: &[String],
    env: &BTreeMap<String, String>,
    cwd: Option<&str>,
    tty: Option<(u16, u16)>,
) -> Result<(), String> {
    if argv.is_empty() {
        return Err("empty command".into());
    }
    let ctx = context();
    let mut env = env.clone();
    if tty.is_some() {
        env.entry("TERM".into()).or_insert_with(|| "xterm".into());
    }
    let mut cmd = ctx
        .command(argv, &env, cwd, tty.is_some())
        .map_err(|e| e.to_string())?;
    let (pty, outputs) = match tty {
        Some((rows, cols)) => {
            let (master, slave) = open_pty(rows, cols)?;
            let io = |f: &OwnedFd| f.try_clone().map(Stdio::from);
            let clone = |e: std::io::Error| format!("pty: {e}");
            cmd.stdin(io(&slave).map_err(clone)?)
                .stdout(io(&slave).map_err(clone)?)
                .stderr(Stdio::from(slave));
            let master = File::from(master);
            let reader = master.try_clone().map_err(clone)?;
            (Some(master), vec![("out", reader)])
        }
        None => {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            (None, Vec::new())
        }
    };
    let (mut child, exited) = reaper::spawn(&mut cmd).map_err(|e| format!("{}: {e}", argv[0]))?;
    let pid = child.id() as i32;
    let mut outputs = outputs;
    if let Some(out) = child.stdout.take() {
        outputs.push(("out", File::from(OwnedFd::from(out))));
    }
    if let Some(err) = child.stderr.take() {
        outputs.push(("err", File::from(OwnedFd::from(err))));
    }
    let input = match (&pty, child.stdin.take()) {
        (Some(master), _) => master.try_clone().ok(),
        (None, Some(stdin)) => Some(File::from(OwnedFd::from(stdin))),
        (None, None) => None,
    };
    let input = match input.map(|f| writer(ch, f, pid)).transpose() {
        Ok(input) => input,
        Err(e) => {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            return Err(e);
        }
    };
    insert(ch, input, pid, pty);
    let (done_tx, done_rx) = mpsc::channel();
    let pumps = outputs.len();
    for (kind, file) in outputs {
        let done = done_tx.clone();
        spawn_named("exec-out", move || {
            pump(ch, kind, file);
            let _ = done.send(());
        })?;
    }
    spawn_named("exec-wait", move || {
        let status = exited.wait();
        // Output a command left in its pipes comes first; a pty stays open
        // while something the command started holds it, so do not wait
        // for that forever.
        let deadline = Instant::now() + Duration::from_secs(2);
        for _ in 0..pumps {
            let left = deadline.saturating_duration_since(Instant::now());
            if done_rx.recv_timeout(left).is_err() {
                break;
            }
        }
        let (code, signal) = if libc::WIFEXITED(status) {
            (libc::WEXITSTATUS(status), 0)
        } else if libc::WIFSIGNALED(status) {
            (128 + libc::WTERMSIG(status), libc::WTERMSIG(status))
        } else {
            (255, 0)
        };
        finish(ch, code, signal);
    })
}

fn spawn_named(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), String> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(|_| ())
        .map_err(|e| format!("cannot start a thread: {e}"))
}

/// The session is over: say how, and forget it.
fn finish(ch: u64, code: i32, signal: i32) {
    if sessions().as_mut().and_then(|s| s.remove(&ch)).is_some() {
        send(&format!("exit {ch} {code} {signal}\n"));
    }
}

/// Send what `file` yields as `kind` lines until its end. False on a read
/// error other than the end of a pty.
fn pump(ch: u64, kind: &str, mut file: File) -> bool {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return true,
            // A cancelled session (killed, its host gone) reads no further.
            Ok(_) if !exists(ch) => return false,
            Ok(n) => {
                if !send(&format!("{kind} {ch} {}\n", B64.encode(&buf[..n]))) {
                    return false;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A pty master reads EIO once the last holder of its slave is gone.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => return true,
            Err(e) => {
                send(&format!(
                    "err {ch} {}\n",
                    B64.encode(format!("hatch: reading: {e}\n"))
                ));
                return false;
            }
        }
    }
}

/// One `in` line: a single base64 word.
fn input(ch: u64, words: &[&str]) -> Result<(), String> {
    let decoded = match words {
        [data] => B64.decode(data).map_err(|e| e.to_string()),
        _ => Err(format!("{} words where one was expected", words.len())),
    };
    let bytes = match decoded {
        Ok(bytes) => bytes,
        Err(e) => {
            // The session's input is damaged: its command must not run on
            // with a hole in it.
            abort(ch, &format!("damaged input: {e}"));
            return Ok(());
        }
    };
    let guard = sessions();
    if let Some(tx) = guard
        .as_ref()
        .and_then(|s| s.get(&ch))
        .and_then(|s| s.input.as_ref())
    {
        // The writer may be gone (the command closed its stdin): dropped.
        let _ = tx.send(bytes);
    }
    Ok(())
}

fn eof(ch: u64) -> Result<(), String> {
    // Dropping the sender ends the writer: a command's stdin closes, a
    // file copy is synced and ends (a pty stays open through its master,
    // kept for resizes).
    if let Some(s) = sessions().as_mut().and_then(|s| s.get_mut(&ch)) {
        s.input = None;
    }
    Ok(())
}

fn resize(ch: u64, args: &[&str]) -> Result<(), String> {
    let (Some(rows), Some(cols)) = (
        args.first().and_then(|r| r.parse::<u16>().ok()),
        args.get(1).and_then(|c| c.parse::<u16>().ok()),
    ) else {
        return Err("bad resize".into());
    };
    let guard = sessions();
    if let Some(pty) = guard
        .as_ref()
        .and_then(|s| s.get(&ch))
        .and_then(|s| s.pty.as_ref())
    {
        set_size(pty.as_raw_fd(), rows, cols);
    }
    Ok(())
}

fn kill(ch: u64, args: &[&str]) -> Result<(), String> {
    let sig = args
        .first()
        .and_then(|s| s.parse::<i32>().ok())
        .filter(|s| (1..=64).contains(s))
        .ok_or("bad signal")?;
    let pid = sessions()
        .as_ref()
        .and_then(|s| s.get(&ch))
        .map(|s| s.pid)
        .unwrap_or(0);
    if pid == 0 {
        // A file copy: cancelled (its reader stops at the next chunk).
        sessions().as_mut().and_then(|s| s.remove(&ch));
        return Ok(());
    }
    if pid > 0 {
        // The whole process group: the command is its session's leader.
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(-pid, sig) };
    }
    Ok(())
}

fn open_pty(rows: u16, cols: u16) -> Result<(OwnedFd, OwnedFd), String> {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the given ints; name,
    // termios and winsize may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(format!("openpty: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: openpty succeeded: both are new descriptors owned here.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&master, &slave] {
        // SAFETY: F_SETFD on a descriptor we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    if rows > 0 && cols > 0 {
        set_size(master.as_raw_fd(), rows, cols);
    }
    Ok((master, slave))
}

fn set_size(fd: i32, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize that outlives the call.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
}

/// Children and their exit statuses. As PID 1 (app mode) hatch-guest reaps
/// every process with `waitpid(-1)`, so a command's status comes from that
/// loop ([`reaper::reap_one`]); otherwise each command is waited for itself.
pub mod reaper {
    use super::*;

    static EXTERNAL: AtomicBool = AtomicBool::new(false);
    static WAITING: Mutex<Option<HashMap<i32, mpsc::Sender<i32>>>> = Mutex::new(None);

    /// From now on PID 1's loop reaps children and hands statuses here.
    pub fn use_external() {
        EXTERNAL.store(true, Ordering::Relaxed);
    }

    pub enum Exited {
        Own(i32),
        Told(mpsc::Receiver<i32>),
    }

    impl Exited {
        /// The raw wait status.
        pub fn wait(self) -> i32 {
            match self {
                Exited::Own(pid) => loop {
                    let mut status = 0;
                    // SAFETY: waitpid writes only to `status`.
                    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
                    if rc == pid {
                        return status;
                    }
                    if rc < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR)
                    {
                        return 255 << 8;
                    }
                },
                Exited::Told(rx) => rx.recv().unwrap_or(255 << 8),
            }
        }
    }

    /// Spawn `cmd`, registered before the reaping loop can see its end.
    pub fn spawn(cmd: &mut Command) -> std::io::Result<(std::process::Child, Exited)> {
        if !EXTERNAL.load(Ordering::Relaxed) {
            let child = cmd.spawn()?;
            let pid = child.id() as i32;
            return Ok((child, Exited::Own(pid)));
        }
        let mut waiting = WAITING.lock().unwrap_or_else(|p| p.into_inner());
        let child = cmd.spawn()?;
        let (tx, rx) = mpsc::channel();
        waiting
            .get_or_insert_with(HashMap::new)
            .insert(child.id() as i32, tx);
        Ok((child, Exited::Told(rx)))
    }

    /// PID 1's reaping step: wait for any child to end, reap it, and hand
    /// a command's status to its waiter. Returns the reaped pid and status
    /// (None when the child was reaped by someone else meanwhile).
    ///
    /// The child is only looked at first (`WNOWAIT`), then reaped under
    /// the spawn lock: std's `spawn` reaps a child whose exec failed itself
    /// (and panics if it is gone), so PID 1 must not take it from under it.
    pub fn reap_one() -> std::io::Result<Option<(i32, i32)>> {
        // SAFETY: siginfo_t is plain data; waitid fills it in.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: a valid siginfo_t pointer for the call's duration.
        let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: waitid succeeded with WEXITED: si_pid is set.
        let pid = unsafe { info.si_pid() };
        let mut waiting = WAITING.lock().unwrap_or_else(|p| p.into_inner());
        let mut status = 0;
        // SAFETY: waitpid writes only to `status`.
        let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if reaped != pid {
            return Ok(None);
        }
        if let Some(tx) = waiting.as_mut().and_then(|w| w.remove(&pid)) {
            let _ = tx.send(status);
        }
        Ok(Some((pid, status)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_requests_parse() {
        let s: Start = serde_json::from_str(
            r#"{"op":"run","cmd":["ls","-l"],"tty":true,"rows":24,"cols":80}"#,
        )
        .unwrap();
        assert!(
            matches!(s, Start::Run { ref cmd, tty: true, rows: 24, cols: 80, .. } if cmd.len() == 2)
        );
        let s: Start = serde_json::from_str(r#"{"op":"write","path":"/x"}"#).unwrap();
        assert!(matches!(s, Start::Write { mode: 0o644, .. }));
        assert!(serde_json::from_str::<Start>(r#"{"op":"format","path":"/"}"#).is_err());
    }

    #[test]
    fn commands_run_and_report_their_status() {
        let ctx = Context::default();
        let mut cmd = ctx
            .command(
                &["sh".into(), "-c".into(), "exit 7".into()],
                &BTreeMap::new(),
                Some("/tmp"),
                false,
            )
            .unwrap();
        let (_child, exited) = reaper::spawn(&mut cmd).unwrap();
        let status = exited.wait();
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 7);
    }

    /// A damaged input line ends its session: the command is killed, not
    /// left to run on with a hole in its input.
    #[test]
    fn damaged_input_kills_the_command() {
        let ch = 0x5eed;
        let start = B64.encode(r#"{"op":"run","cmd":["sleep","600"]}"#);
        assert!(handle(&format!("exec {ch} {start}")));
        let pid = sessions().as_ref().unwrap()[&ch].pid;
        assert!(pid > 0);
        // Half an input line with the next line glued to it.
        assert!(handle(&format!("in {ch} eHh4eHh4kill {ch} 9")));
        assert!(!exists(ch));
        // Gone once its waiter has reaped it.
        // SAFETY: signal 0 only checks that the process exists.
        while unsafe { libc::kill(pid, 0) } == 0 {
            std::thread::yield_now();
        }
    }
}
