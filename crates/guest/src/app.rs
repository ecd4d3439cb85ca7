//! App mode: `hatch-guest --app ROOT` is PID 1 of a VM booted from an
//! imported container image (its root file system mounted at ROOT by the
//! initramfs, its config at `ROOT/.hatch/app.json`). It mounts what a Linux
//! userland expects below ROOT, runs the app there (chroot, working dir,
//! user, environment) with its output on the console (`hatch vm logs`),
//! forwards signals to it, reaps orphans, keeps the agent running, and
//! powers the VM off when the app exits (the host records why).

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};

use serde::Deserialize;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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
    let app = match read_app(root) {
        Ok(app) => app,
        Err(e) => power_off(&format!("the app config is unreadable: {e}")),
    };
    let argv: Vec<String> = app.entrypoint.iter().chain(&app.cmd).cloned().collect();
    if argv.is_empty() {
        power_off("the image names no command (no Entrypoint nor Cmd)");
    }
    let ids = match resolve_user(root, &app.user) {
        Ok(ids) => ids,
        Err(e) => power_off(&format!("user {:?}: {e}", app.user)),
    };
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
    let pid = match spawn(root, &app, &argv, ids) {
        Ok(pid) => pid,
        Err(e) => power_off(&format!("cannot start {:?}: {e}", argv[0])),
    };
    APP_PID.store(pid, Ordering::Relaxed);
    eprintln!("hatch: app started: {}", argv.join(" "));
    reap_until(pid)
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

fn spawn(
    root: &Path,
    app: &App,
    argv: &[String],
    (uid, gid, home): (u32, u32, String),
) -> std::io::Result<i32> {
    let root = CString::new(root.as_os_str().as_encoded_bytes())?;
    let dir = if app.working_dir.is_empty() {
        "/"
    } else {
        &app.working_dir
    };
    let dir = CString::new(dir)?;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).env_clear();
    let mut has_path = false;
    for kv in &app.env {
        if let Some((k, v)) = kv.split_once('=') {
            has_path |= k == "PATH";
            cmd.env(k, v);
        }
    }
    if !has_path {
        cmd.env("PATH", DEFAULT_PATH);
    }
    if !app.env.iter().any(|kv| kv.starts_with("HOME=")) {
        cmd.env("HOME", &home);
    }
    cmd.stdin(Stdio::null());
    // SAFETY: between fork and exec only async-signal-safe calls (chroot,
    // chdir, setgroups, setgid, setuid) on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::chroot(root.as_ptr()) != 0 || libc::chdir(dir.as_ptr()) != 0 {
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
    let child = cmd.spawn()?;
    Ok(child.id() as i32)
}

/// Reap every child (PID 1 adopts orphans) until the app exits; then power
/// off, saying how it ended.
fn reap_until(app: i32) -> ! {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes only to `status`.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == app {
            let how = if libc::WIFEXITED(status) {
                format!("exited with status {}", libc::WEXITSTATUS(status))
            } else if libc::WIFSIGNALED(status) {
                format!("was killed by signal {}", libc::WTERMSIG(status))
            } else {
                "ended".to_string()
            };
            power_off(&format!("the app {how}"));
        }
        if pid < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            power_off("the app is gone");
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
