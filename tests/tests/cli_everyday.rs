//! Everyday use of the `hatch` CLI against a real daemon: the key file,
//! bare addresses, image listing without flags, waiting with progress,
//! following logs, retention changes, garbage collection, routes by host.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use hatch_e2e::{Daemon, Garage, KEY, hatch_bin, images_dir};
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// `hatch` with the daemon's address and key, and nothing else from the
/// environment that would pick a key file or images directory.
fn cmd(d: &Daemon) -> Command {
    let mut cmd = Command::new(hatch_bin());
    cmd.env("HATCH_API", format!("http://{}", d.api_addr))
        .env("HATCH_API_KEY", KEY)
        .env_remove("HATCH_DATA_DIR")
        .env_remove("HATCH_IMAGES_DIR")
        .env_remove("HATCH_IMAGE_CACHE_DIR")
        .env_remove("HATCH_CACHE_DIR");
    cmd
}

struct Run {
    ok: bool,
    out: String,
    err: String,
}

fn run(mut cmd: Command, args: &[&str]) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.args(args).output().unwrap();
    Run {
        ok: status.success(),
        out: String::from_utf8_lossy(&stdout).into_owned(),
        err: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// Run and expect success; the stdout parsed as JSON.
fn run_json(cmd: Command, args: &[&str]) -> (Value, String) {
    let r = run(cmd, args);
    assert!(r.ok, "hatch {args:?} failed: {}", r.err);
    let v = serde_json::from_str(&r.out)
        .unwrap_or_else(|e| panic!("hatch {args:?}: stdout is not JSON ({e}): {}", r.out));
    (v, r.err)
}

fn write_key(dir: &Path, key: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("api-key"), key).unwrap();
}

#[tokio::test]
async fn cli_finds_the_key_file_takes_a_bare_address_and_lists_images_without_flags() {
    let d = Daemon::start().await;
    let home = tempfile::tempdir().unwrap();
    let key_dir = home.path().join(".local/share/hatch");

    // No key anywhere: the error names the file it looked at.
    let mut c = cmd(&d);
    c.env_remove("HATCH_API_KEY").env("HOME", home.path());
    let r = run(c, &["vm", "list"]);
    assert!(!r.ok);
    let key_file = key_dir.join("api-key");
    assert!(
        r.err.contains("no API key") && r.err.contains(&key_file.display().to_string()),
        "{}",
        r.err
    );

    // The file scripts/up.sh writes (with its newline), and a bare address.
    write_key(&key_dir, &format!("{KEY}\n"));
    let mut c = cmd(&d);
    c.env_remove("HATCH_API_KEY")
        .env_remove("HATCH_API")
        .env("HOME", home.path());
    let (list, _) = run_json(
        c,
        &["vm", "list", "--json", "--api", &d.api_addr.to_string()],
    );
    assert_eq!(list["vms"], serde_json::json!([]));

    // HATCH_DATA_DIR's key file comes first.
    let data_dir = tempfile::tempdir().unwrap();
    write_key(data_dir.path(), "hatch_not_the_key_000000000000");
    let mut c = cmd(&d);
    c.env_remove("HATCH_API_KEY")
        .env("HOME", home.path())
        .env("HATCH_DATA_DIR", data_dir.path());
    let r = run(c, &["vm", "list"]);
    assert!(!r.ok);
    assert!(r.err.contains("(unauthorized, HTTP 401)"), "{}", r.err);

    // An unreadable key file (a directory) is named too.
    let bad = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(bad.path().join("api-key")).unwrap();
    let mut c = cmd(&d);
    c.env_remove("HATCH_API_KEY")
        .env("HATCH_DATA_DIR", bad.path());
    let r = run(c, &["key", "list"]);
    assert!(!r.ok);
    assert!(
        r.err
            .contains(&bad.path().join("api-key").display().to_string()),
        "{}",
        r.err
    );

    // `hatch image list` with no flags: the default data dir's images
    // (none here) and the image cache, where the default image is.
    std::fs::create_dir_all(home.path().join(".cache/hatch")).unwrap();
    std::os::unix::fs::symlink(images_dir(), home.path().join(".cache/hatch/images")).unwrap();
    let mut c = cmd(&d);
    c.env("HOME", home.path());
    let r = run(c, &["image", "list"]);
    assert!(r.ok, "{}", r.err);
    let lines: Vec<&str> = r.out.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("DIR"),
        "{}",
        r.out
    );
    let cache = home.path().join(".cache/hatch/images");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("default ") && l.ends_with(&cache.display().to_string())),
        "{}",
        r.out
    );
    let mut c = cmd(&d);
    c.env("HOME", home.path());
    let (images, _) = run_json(c, &["image", "list", "--json"]);
    let default = images
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "default")
        .unwrap();
    assert_eq!(default["dir"], cache.display().to_string());
    assert_eq!(default["shadowed"], false);
    // Listing created nothing.
    assert!(!home.path().join(".local/share/hatch/images").exists());

    // --json everywhere: keys.
    let (keys, _) = run_json(cmd(&d), &["key", "list", "--json"]);
    assert!(
        keys["keys"].as_array().is_some_and(|k| !k.is_empty()),
        "{keys}"
    );
}

#[tokio::test]
async fn cli_waits_for_the_vm_routes_by_host_and_follows_logs_until_the_vm_is_deleted() {
    let d = Daemon::start().await;
    let (vm, err) = run_json(
        cmd(&d),
        &[
            "vm", "create", "--name", "every", "--memory", "128", "--wait", "--json",
        ],
    );
    assert_eq!(vm["state"], "running", "{vm}");
    if let Some(ready) = vm.get("ready") {
        assert_eq!(ready, true, "--wait waits for the app: {vm}");
    }
    let id = vm["id"].as_str().unwrap().to_string();
    // Progress went to stderr, one line per phase; the last says it runs.
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!("vm every ({id}): running [")),
        "{err}"
    );

    // A bare number is seconds.
    let (route, _) = run_json(
        cmd(&d),
        &[
            "route",
            "create",
            "--host",
            "z.localhost",
            "--vm",
            "every",
            "--idle-timeout",
            "10",
            "--no-auto-wake",
            "--json",
        ],
    );
    assert_eq!(route["idle_timeout_seconds"], 10, "{route}");
    assert_eq!(route["hostname"], "z.localhost");
    d.wait_http("z.localhost", "/").await;

    // Logs as one JSON object.
    let (logs, _) = run_json(cmd(&d), &["vm", "logs", "every", "--json"]);
    assert_eq!(logs["vm"], id.as_str());
    assert_eq!(logs["offset"], 0);
    let text = logs["text"].as_str().unwrap();
    assert!(text.contains("hatch-guest: listening"), "{text}");
    // The offset after the text: the console's length when it was read.
    let next = logs["next_offset"].as_u64().unwrap();
    assert!(
        next > 0 && next <= d.console(&id).len() as u64,
        "{next} {}",
        d.console(&id).len()
    );

    // Events as JSON.
    let (events, _) = run_json(cmd(&d), &["vm", "events", "every", "--json"]);
    assert!(events["events"].is_array(), "{events}");

    // Routes are removed by host name; an unknown one is named.
    let r = run(cmd(&d), &["route", "rm", "z.localhost"]);
    assert!(r.ok, "{}", r.err);
    assert_eq!(
        r.out.trim(),
        format!("deleted {}", route["id"].as_str().unwrap())
    );
    let (routes, _) = run_json(cmd(&d), &["route", "list", "--json"]);
    assert_eq!(routes["routes"], serde_json::json!([]));
    let r = run(cmd(&d), &["route", "rm", "z.localhost"]);
    assert!(!r.ok);
    assert!(
        r.err
            .contains("no route with id or host name 'z.localhost'"),
        "{}",
        r.err
    );
    let r = run(cmd(&d), &["vm", "get", "xyz"]);
    assert!(!r.ok);
    assert!(r.err.contains("'xyz'"), "{}", r.err);

    // Follow: newline-delimited JSON chunks, and a clean end when the VM
    // is deleted.
    let mut follow = cmd(&d);
    let mut child = follow
        .args(["vm", "logs", "every", "-f", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    let chunk: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(chunk["vm"], id.as_str());
    assert_eq!(chunk["offset"], 0);
    assert!(
        chunk["text"]
            .as_str()
            .unwrap()
            .contains("hatch-guest: listening"),
        "{chunk}"
    );
    let (s, b) = d.call(Method::DELETE, &format!("/vms/{id}"), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let out = child.wait_with_output();
        let _ = tx.send(out);
    });
    let out = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("vm logs -f did not end after the VM was deleted")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("vm 'every' was deleted"), "{err}");
    // Whatever else it printed is JSON lines too.
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    for line in rest.lines() {
        serde_json::from_str::<Value>(line).unwrap();
    }
}

#[tokio::test]
async fn cli_shows_snapshot_phases_keeps_retention_limits_and_explains_gc() {
    let garage = Garage::start().await;
    let d = Daemon::start_with_env(garage.env()).await;
    let (vm, _) = run_json(
        cmd(&d),
        &["vm", "create", "--name", "snappy", "--wait", "--json"],
    );
    let id = vm["id"].as_str().unwrap().to_string();

    // The phases on stderr, the final record on stdout.
    let (snap, err) = run_json(
        cmd(&d),
        &["snapshot", "create", "snappy", "--stop", "--wait", "--json"],
    );
    assert_eq!(snap["status"], "ready", "{snap}");
    assert_eq!(snap["vm_id"], id.as_str());
    let sid = snap["id"].as_str().unwrap();
    let lines: Vec<&str> = err.lines().collect();
    let prefix = format!("snapshot {sid}: ");
    assert!(
        lines.len() >= 2 && lines.iter().all(|l| l.starts_with(&prefix)),
        "{err}"
    );
    let phases: Vec<&str> = lines
        .iter()
        .map(|l| l[prefix.len()..].split(' ').next().unwrap())
        .collect();
    assert!(
        phases[..phases.len() - 1]
            .iter()
            .all(|p| ["pending", "capturing", "uploading"].contains(p)),
        "{err}"
    );
    let last = lines.last().unwrap();
    assert!(last.starts_with(&format!("{prefix}ready [")), "{err}");
    assert!(last.contains("memory 256.0 MiB"), "{err}");

    // Restore with progress; the VM record on stdout.
    let (vm, err) = run_json(cmd(&d), &["vm", "restore", "snappy", "--wait", "--json"]);
    assert_eq!(vm["state"], "running", "{vm}");
    assert!(
        err.lines()
            .last()
            .unwrap_or_default()
            .starts_with(&format!("vm snappy ({id}): running [")),
        "{err}"
    );

    // Retention: a later flag keeps the earlier one; `none` lifts a limit.
    let r = run(cmd(&d), &["vm", "retention", "snappy", "--keep-last", "3"]);
    assert!(r.ok, "{}", r.err);
    let (ret, _) = run_json(
        cmd(&d),
        &["vm", "retention", "snappy", "--max-age", "1h", "--json"],
    );
    assert_eq!(
        ret,
        serde_json::json!({ "keep_last": 3, "max_age_seconds": 3600 })
    );
    let (s, ret) = d
        .call(Method::GET, &format!("/vms/{id}/retention"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        ret,
        serde_json::json!({ "keep_last": 3, "max_age_seconds": 3600 })
    );
    let (ret, _) = run_json(
        cmd(&d),
        &["vm", "retention", "snappy", "--keep-last", "none", "--json"],
    );
    assert_eq!(
        ret,
        serde_json::json!({ "keep_last": null, "max_age_seconds": 3600 })
    );
    let r = run(cmd(&d), &["vm", "retention", "snappy"]);
    assert!(r.ok, "{}", r.err);
    assert!(
        r.out.contains("keep_last        none (no limit)") && r.out.contains("3600 (1h)"),
        "{}",
        r.out
    );

    // Storage: usage alone, as JSON, and garbage collection explained.
    let r = run(cmd(&d), &["storage"]);
    assert!(r.ok && r.out.contains("TOTAL"), "{} {}", r.out, r.err);
    let (usage, _) = run_json(cmd(&d), &["storage", "--json"]);
    assert_eq!(usage["total"]["snapshots"], 1, "{usage}");
    let r = run(cmd(&d), &["storage", "gc"]);
    assert!(r.ok, "{}", r.err);
    assert!(
        r.out.starts_with("deleted ")
            && r.out.contains(" referenced by 1 manifest and ")
            && r.out.contains("younger than the grace period (")
            && r.out.contains("HATCH_GC_GRACE_SECONDS"),
        "{}",
        r.out
    );
    let (gc, _) = run_json(cmd(&d), &["storage", "gc", "--json"]);
    assert_eq!(gc["manifests"], 1, "{gc}");
    assert!(gc["chunks"].as_u64().unwrap() > 0, "{gc}");

    // Errors name what was typed; --json on deletes.
    let r = run(cmd(&d), &["snapshot", "get", "snappy", "snap-nope"]);
    assert!(!r.ok);
    assert!(
        r.err
            .contains("snapshot 'snap-nope' of vm 'snappy' not found"),
        "{}",
        r.err
    );
    let (snap2, _) = run_json(
        cmd(&d),
        &["snapshot", "create", "snappy", "--wait", "--json"],
    );
    let sid2 = snap2["id"].as_str().unwrap();
    let (deleted, _) = run_json(cmd(&d), &["snapshot", "rm", "snappy", sid, "--json"]);
    assert_eq!(deleted, serde_json::json!({ "deleted": sid }));
    assert_ne!(sid, sid2);
}
