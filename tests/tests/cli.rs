//! The `hatch` CLI against a real daemon.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use hatch_e2e::{Daemon, KEY, hatch_bin};

fn hatch(d: &Daemon, key: Option<&str>, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(hatch_bin());
    cmd.args(args)
        .env("HATCH_API", format!("http://{}", d.api_addr))
        .env_remove("HATCH_API_KEY")
        // No key file from a set-up on this machine: a HOME of its own.
        .env("HOME", d.data_dir.path().join("home"))
        .env_remove("HATCH_DATA_DIR");
    if let Some(k) = key {
        cmd.env("HATCH_API_KEY", k);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn cli_manages_vms_and_routes_with_tables_json_and_clear_errors() {
    let d = Daemon::start().await;

    let (ok, _, err) = hatch(&d, None, &["vm", "list"]);
    assert!(!ok);
    assert!(err.contains("no API key"), "{err}");
    let (ok, _, err) = hatch(&d, Some("hatch_wrong_key_wrong_key"), &["vm", "list"]);
    assert!(!ok);
    assert!(err.contains("(unauthorized, HTTP 401)"), "{err}");
    let (ok, _, err) = hatch(&d, Some(KEY), &["vm", "create", "--vcpus", "999"]);
    assert!(!ok);
    assert!(err.contains("vcpus must be between 1 and"), "{err}");

    let (ok, out, err) = hatch(
        &d,
        Some(KEY),
        &[
            "vm", "create", "--name", "cli-vm", "--memory", "128", "--wait", "--json",
        ],
    );
    assert!(ok, "{err}");
    let vm: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["memory_mib"], 128);

    let (ok, out, _) = hatch(&d, Some(KEY), &["vm", "list"]);
    assert!(ok);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("STATE"),
        "{out}"
    );
    assert!(
        lines[1].contains("cli-vm") && lines[1].contains("running"),
        "{out}"
    );

    let (ok, out, err) = hatch(
        &d,
        Some(KEY),
        &[
            "route",
            "create",
            "--host",
            "cli.localhost",
            "--vm",
            "cli-vm",
            "--idle-timeout",
            "5m",
            "--no-auto-wake",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("idle_timeout_seconds  300"), "{out}");
    let (ok, out, _) = hatch(&d, Some(KEY), &["route", "list"]);
    assert!(ok);
    assert!(
        out.lines().nth(1).unwrap().contains("cli.localhost"),
        "{out}"
    );
    assert!(
        out.contains("running"),
        "route listing shows the VM state: {out}"
    );

    d.wait_http("cli.localhost", "/").await;
    let (ok, out, _) = hatch(&d, Some(KEY), &["vm", "logs", "cli-vm"]);
    assert!(ok);
    assert!(out.contains("hatch-guest: listening"), "console log: {out}");

    let (ok, _, err) = hatch(&d, Some(KEY), &["vm", "get", "nope"]);
    assert!(!ok);
    assert!(err.contains("no vm with id or name 'nope'"), "{err}");

    let (ok, out, _) = hatch(&d, Some(KEY), &["vm", "stop", "cli-vm", "--wait", "--json"]);
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["state"],
        "stopped"
    );
    let (ok, out, _) = hatch(&d, Some(KEY), &["vm", "rm", "cli-vm"]);
    assert!(ok);
    assert!(out.starts_with("deleted vm-"), "{out}");
    let (ok, out, _) = hatch(&d, Some(KEY), &["vm", "list", "--json"]);
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["vms"],
        serde_json::json!([])
    );
}

#[tokio::test]
async fn cli_snapshots_restores_and_shows_storage() {
    let garage = hatch_e2e::Garage::start().await;
    let d = Daemon::start_with_env(garage.env()).await;
    let (ok, _, err) = hatch(
        &d,
        Some(KEY),
        &["vm", "create", "--name", "snap-cli", "--wait"],
    );
    assert!(ok, "{err}");

    let (ok, out, err) = hatch(
        &d,
        Some(KEY),
        &[
            "snapshot", "create", "snap-cli", "--stop", "--wait", "--json",
        ],
    );
    assert!(ok, "{err}");
    let snap: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(snap["status"], "ready");
    let sid = snap["id"].as_str().unwrap();

    let (ok, out, _) = hatch(&d, Some(KEY), &["snapshot", "list", "snap-cli"]);
    assert!(ok);
    assert!(out.lines().nth(1).unwrap().starts_with(sid), "{out}");
    assert!(out.contains("ready") && out.contains("manual"), "{out}");

    let (ok, out, err) = hatch(
        &d,
        Some(KEY),
        &["vm", "restore", "snap-cli", "--wait", "--json"],
    );
    assert!(ok, "{err}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["state"],
        "running"
    );

    let (ok, out, _) = hatch(&d, Some(KEY), &["storage"]);
    assert!(ok);
    assert!(out.contains("snap-cli") && out.contains("TOTAL"), "{out}");

    let (ok, out, err) = hatch(
        &d,
        Some(KEY),
        &[
            "vm",
            "retention",
            "snap-cli",
            "--keep-last",
            "3",
            "--max-age",
            "7d",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("keep_last") && out.contains("604800"), "{out}");

    let (ok, _, err) = hatch(&d, Some(KEY), &["snapshot", "get", "snap-cli", "snap-nope"]);
    assert!(!ok);
    assert!(err.contains("not found"), "{err}");
}

#[tokio::test]
async fn cli_creates_lists_and_revokes_api_keys() {
    let d = Daemon::start().await;
    let (ok, key, err) = hatch(&d, Some(KEY), &["key", "create", "deploy-bot"]);
    assert!(ok, "{err}");
    let key = key.trim().to_string();
    assert!(key.starts_with("hatch_"), "{key}");
    assert!(err.contains("shown only this once"), "{err}");
    let (ok, out, _) = hatch(&d, Some(&key), &["key", "list"]);
    assert!(ok, "the new key works");
    assert!(out.contains("deploy-bot") && out.contains("api"), "{out}");
    assert!(!out.contains(&key), "{out}");
    let (ok, out, err) = hatch(&d, Some(KEY), &["key", "revoke", "deploy-bot"]);
    assert!(ok, "{err}");
    assert!(out.contains("revoked deploy-bot"), "{out}");
    let (ok, _, err) = hatch(&d, Some(&key), &["vm", "list"]);
    assert!(!ok);
    assert!(err.contains("(unauthorized, HTTP 401)"), "{err}");
}
