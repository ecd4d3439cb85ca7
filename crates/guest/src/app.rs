//! App mode: `hatch-guest --app ROOT` is PID 1 of a VM booted from an
//! imported container image (its root file system mounted at ROOT by the
//! initramfs, its config at `ROOT/.hatch/app.json`). It mounts what a Linux
//! userland expects below ROOT, runs the app there (chroot, working dir,
//! user, environment) with its output on the console (`hatch vm logs`),
//! forwards signals to it, reaps orphans, keeps the agent running, and
//! powers the VM off when the app exits (the host records why).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicI32, Ordering};

use serde::Deserialize;

/// `.hatch/app.json`, as `hatch image import` wrote it.
#[derive(Debug, Default, Deserialize)]
pub struct App {
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub working_dir: String,
    #[serde(default)]
    pub user: String,
}

/// The app's process, for the signal handler.
static APP_PID: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = APP_PID.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe; a stale pid is harmless here
        // (PID 1 reaps it only after this handler can no longer name it).
        unsafe { libc::kill(pid, sig) };
    }
}

pub fn run(root: &Path) -> ! {
    if let Err(e) = mount_userland(root) {
        eprintln!("hatch: {e}");
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    set_hostname(&cmdline);
    let mut app = match read_app(root) {
        Ok(app) => app,
        Err(e) => power_off(&format!("the app config is unreadable: {e}")),
    };
    let overrides = match overrides(&cmdline) {
        Ok(o) => o,
        Err(e) => power_off(&format!("the VM's env/cmd overrides are unreadable: {e}")),
    };
    if let Some(cmd) = overrides.cmd {
        app.cmd = cmd;
    }
    let argv: Vec<String> = app.entrypoint.iter().chain(&app.cmd).cloned().collect();
    if argv.is_empty() {
        power_off("the image names no command (no Entrypoint nor Cmd)");
    }
    let ctx = match context(root, &app, &overrides.env) {
        Ok(ctx) => ctx,
        Err(e) => power_off(&format!("user {:?}: {e}", app.user)),
    };
    // Commands run through exec find the app's world; their ends reach
    // them through the reaping loop below.
    crate::exec::set_context(ctx.clone());
    crate::exec::reaper::use_external();
    std::thread::Builder::new()
        .name("agent".into())
        .spawn(crate::agent::run)
        .map_err(|e| eprintln!("hatch: cannot start the agent: {e}"))
        .ok();
    for sig in [
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ] {
        // SAFETY: `forward` only calls async-signal-safe functions.
        unsafe { libc::signal(sig, forward as *const () as libc::sighandler_t) };
    }
    let policy = overrides.restart.unwrap_or_default();
    // Restarts in a row: a run that lasted a minute starts the count again.
    let mut restarts = 0u32;
    loop {
        let spawned = ctx
            .command(&argv, &BTreeMap::new(), None, false)
            .and_then(|mut cmd| cmd.stdin(Stdio::null()).spawn());
        let pid = match spawned {
            Ok(child) => child.id() as i32,
            Err(e) => power_off(&format!("cannot start {:?}: {e}", argv[0])),
        };
        let started = std::time::Instant::now();
        APP_PID.store(pid, Ordering::Relaxed);
        eprintln!("hatch: app started: {}", argv.join(" "));
        let status = reap_until(pid);
        APP_PID.store(0, Ordering::Relaxed);
        let how = describe(status);
        let failed = !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        if started.elapsed() > std::time::Duration::from_secs(60) {
            restarts = 0;
        }
        if !policy.restarts(failed, restarts) {
            power_off(&format!("the app {how}"));
        }
        restarts += 1;
        let delay = std::time::Duration::from_millis(100 << restarts.min(7));
        eprintln!(
            "hatch: the app {how}; restarting it in {} ms (restart {restarts})",
            delay.as_millis()
        );
        std::thread::sleep(delay);
    }
}

/// `restart` of the VM's settings.
#[derive(Debug, Default, Deserialize, PartialEq)]
struct Restart {
    #[serde(default)]
    policy: String,
    #[serde(default)]
    max_retries: Option<u32>,
}

impl Restart {
    /// Whether the app is started again after an exit (`failed`: not
    /// status 0) that follows `done` restarts in a row.
    fn restarts(&self, failed: bool, done: u32) -> bool {
        match self.policy.as_str() {
            "always" => true,
            "on-failure" => failed && done < self.max_retries.unwrap_or(10),
            _ => false,
        }
    }
}

fn describe(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exited with status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("was killed by signal {}", libc::WTERMSIG(status))
    } else {
        "ended".to_string()
    }
}

/// Per-VM settings from `POST /vms` (`env`, `cmd`), passed on the kernel
/// command line as `hatch.app=<base64 of JSON>`.
#[derive(Debug, Default, Deserialize, PartialEq)]
struct Overrides {
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    restart: Option<Restart>,
}

fn overrides(cmdline: &str) -> Result<Overrides, String> {
    use base64::Engine;
    let Some(encoded) = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("hatch.app="))
    else {
        return Ok(Overrides::default());
    };
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&json).map_err(|e| e.to_string())
}

/// `hatch.hostname=NAME` (the VM's name) becomes the hostname.
fn set_hostname(cmdline: &str) {
    let Some(name) = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("hatch.hostname="))
    else {
        return;
    };
    // SAFETY: the pointer and length describe `name`'s bytes.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc != 0 {
        eprintln!(
            "hatch: sethostname {name:?}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Where the app and exec'd commands run: the image root, its user, its
/// environment (PATH and HOME defaulted) with the VM's `env` on top.
fn context(
    root: &Path,
    app: &App,
    extra: &BTreeMap<String, String>,
) -> Result<crate::exec::Context, String> {
    let (uid, gid, home) = resolve_user(root, &app.user)?;
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| {
        env.retain(|(key, _)| key != k);
        env.push((k.to_string(), v.to_string()));
    };
    set("PATH", crate::exec::DEFAULT_PATH);
    set("HOME", &home);
    for kv in &app.env {
        if let Some((k, v)) = kv.split_once('=') {
            set(k, v);
        }
    }
    for (k, v) in extra {
        set(k, v);
    }
    Ok(crate::exec::Context {
        root: root.to_path_buf(),
        env,
        working_dir: if app.working_dir.is_empty() {
            "/".into()
        } else {
            app.working_dir.clone()
        },
        uid,
        gid,
    })
}

/// proc, sys, dev, dev/pts, dev/shm below `root` (and a sticky /tmp).
fn mount_userland(root: &Path) -> Result<(), String> {
    let mounts: [(&str, &str, &str, libc::c_ulong); 5] = [
        ("proc", "proc", "proc", 0),
        ("sysfs", "sys", "sysfs", 0),
        ("/dev", "dev", "", libc::MS_BIND | libc::MS_REC),
        ("devpts", "dev/pts", "devpts", 0),
        ("shm", "dev/shm", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV),
    ];
    for (source, target, fstype, flags) in mounts {
        let target = root.join(target);
        std::fs::create_dir_all(&target)
            .map_err(|e| format!("creating {}: {e}", target.display()))?;
        let c = |s: &str| CString::new(s).map_err(|e| e.to_string());
        let (src, dst, fs) = (c(source)?, c(&target.to_string_lossy())?, c(fstype)?);
        let fs_ptr = if fstype.is_empty() {
            std::ptr::null()
        } else {
            fs.as_ptr()
        };
        // SAFETY: all pointers are NUL-terminated strings that outlive the
        // call (or null for the bind mount's type).
        let rc =
            unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fs_ptr, flags, std::ptr::null()) };
        if rc != 0 {
            eprintln!(
                "hatch: mounting {} failed: {}",
                target.display(),
                std::io::Error::last_os_error()
            );
        }
    }
    // The resolver the initramfs was given, as Docker provides one.
    let resolv = root.join("etc/resolv.conf");
    // A symlink there (e.g. to systemd's stub) would be followed out of
    // the image: replaced by the file.
    let _ = std::fs::remove_file(&resolv);
    if root.join("etc").is_dir()
        && let Err(e) = std::fs::copy("/etc/resolv.conf", &resolv)
    {
        eprintln!("hatch: writing etc/resolv.conf: {e}");
    }
    let tmp = root.join("tmp");
    if std::fs::create_dir_all(&tmp).is_ok() {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777));
    }
    Ok(())
}

fn read_app(root: &Path) -> Result<App, String> {
    let bytes = std::fs::read(root.join(".hatch/app.json")).map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

/// uid, gid and home of `user` (`name`, `uid`, `name:group`, `uid:gid`;
/// root when empty), from the image's /etc/passwd and /etc/group.
fn resolve_user(root: &Path, user: &str) -> Result<(u32, u32, String), String> {
    if user.is_empty() {
        return Ok((0, 0, "/root".into()));
    }
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap_or_default();
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap_or_default();
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 6 && (f[0] == u || f[2] == u));
    let uid: u32 = match (&entry, u.parse()) {
        (Some(f), _) => f[2].parse().map_err(|_| "bad /etc/passwd entry")?,
        (None, Ok(uid)) => uid,
        (None, Err(_)) => return Err("no such user in the image's /etc/passwd".into()),
    };
    let gid: u32 = match g {
        Some(g) => match g.parse() {
            Ok(gid) => gid,
            Err(_) => group
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or("no such group in the image's /etc/group")?,
        },
        None => entry
            .as_ref()
            .and_then(|f| f[3].parse().ok())
            .unwrap_or(uid),
    };
    let home = entry
        .map(|f| f[5].to_string())
        .unwrap_or_else(|| "/".into());
    Ok((uid, gid, home))
}

/// Reap every child (PID 1 adopts orphans) until the app exits; its wait
/// status.
fn reap_until(app: i32) -> i32 {
    loop {
        match crate::exec::reaper::reap_one() {
            Ok(Some((pid, status))) if pid == app => return status,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(_) => power_off("the app is gone"),
        }
    }
}

fn power_off(why: &str) -> ! {
    eprintln!("hatch: {why}; powering off");
    // SAFETY: sync and reboot have no memory-safety preconditions; PID 1
    // powering off is the intended end of the VM.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_come_from_the_command_line() {
        assert_eq!(overrides("console=ttyS0").unwrap(), Overrides::default());
        // {"env":{"A":"b c"},"cmd":["x"]}
        let line = "quiet hatch.app=eyJlbnYiOnsiQSI6ImIgYyJ9LCJjbWQiOlsieCJdfQ tsc=1";
        let o = overrides(line).unwrap();
        assert_eq!(o.env.get("A").map(String::as_str), Some("b c"));
        assert_eq!(o.cmd, Some(vec!["x".to_string()]));
        assert!(overrides("hatch.app=!!").is_err());
        let on_failure = Restart {
            policy: "on-failure".into(),
            max_retries: Some(2),
        };
        assert!(on_failure.restarts(true, 1));
        assert!(!on_failure.restarts(true, 2), "retries used up");
        assert!(!on_failure.restarts(false, 0), "a clean exit stops");
        assert!(
            Restart {
                policy: "always".into(),
                max_retries: None
            }
            .restarts(false, 99)
        );
        assert!(!Restart::default().restarts(true, 0));
    }

    #[test]
    fn users_resolve_from_the_images_files() {
        let t = std::env::temp_dir().join(format!("hatch-guest-user-{}", std::process::id()));
        std::fs::create_dir_all(t.join("etc")).unwrap();
        std::fs::write(
            t.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:app:/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(t.join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        assert_eq!(resolve_user(&t, "").unwrap(), (0, 0, "/root".into()));
        assert_eq!(
            resolve_user(&t, "app").unwrap(),
            (1000, 1001, "/home/app".into())
        );
        assert_eq!(
            resolve_user(&t, "1000").unwrap(),
            (1000, 1001, "/home/app".into())
        );
        assert_eq!(
            resolve_user(&t, "app:staff").unwrap(),
            (1000, 50, "/home/app".into())
        );
        assert_eq!(resolve_user(&t, "4242:7").unwrap(), (4242, 7, "/".into()));
        assert!(resolve_user(&t, "nobody").is_err());
        assert!(resolve_user(&t, "app:nogroup").is_err());
        std::fs::remove_dir_all(&t).unwrap();
    }
}
