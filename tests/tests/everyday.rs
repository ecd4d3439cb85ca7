//! Everyday use: settings that survive a restart, requests held for a
//! booting VM, the idle clock, default retention, names, start and stop of a
//! suspended VM, stable host ports, and forks.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;

use hatch_e2e::{Daemon, Garage, KEY, kv};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const S3_VARS: [&str; 5] = [
    "HATCH_S3_ENDPOINT",
    "HATCH_S3_BUCKET",
    "HATCH_S3_REGION",
    "HATCH_S3_ACCESS_KEY_ID",
    "HATCH_S3_SECRET_ACCESS_KEY",
];

/// Suspend a VM and wait until S3 holds the snapshot; returns its id.
async fn suspend(d: &Daemon, vm: &str) -> String {
    let sid = d.snapshot(vm, true).await;
    d.wait_snapshot(vm, &sid, "ready").await;
    d.wait_state(vm, "snapshotted").await;
    sid
}

fn host_port(vm: &Value, guest: u64) -> u64 {
    vm["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["guest"] == guest)
        .unwrap_or_else(|| panic!("no forward of {guest}: {vm}"))["host"]
        .as_u64()
        .unwrap()
}

/// The restart `up.sh` documents (`hatch serve --data-dir ... --api-addr ...
/// --proxy-addr ...`, nothing in the environment) keeps S3 and the API key:
/// both come from `<data-dir>/config.toml`.
#[tokio::test]
async fn a_restart_with_only_the_data_dir_keeps_s3_and_the_key_from_the_config_file() {
    let garage = Garage::start().await;
    let mut d = Daemon::start_with_env(garage.env()).await;
    let (id, boot) = d.boot_routed("conf").await;
    d.get_ok("conf.localhost", "/disk/write?name=a&value=kept")
        .await;
    suspend(&d, &id).await;

    d.kill_daemon();
    // A wake must come from S3 (no local copy to fall back on).
    d.wipe_local_snapshots(&id);
    let s3: std::collections::HashMap<String, String> = garage.env().into_iter().collect();
    let config = d.data_dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "api_key = \"{KEY}\"\n[s3]\nendpoint = \"{}\"\nbucket = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
            s3["HATCH_S3_ENDPOINT"],
            s3["HATCH_S3_BUCKET"],
            s3["HATCH_S3_REGION"],
            s3["HATCH_S3_ACCESS_KEY_ID"],
            s3["HATCH_S3_SECRET_ACCESS_KEY"]
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    for var in S3_VARS.into_iter().chain(["HATCH_API_KEY"]) {
        d.remove_env(var);
    }
    d.start_again().await;

    // The key from the file is valid (not revoked as a vanished env key).
    assert_eq!(d.vm(&id).await["state"], "snapshotted");
    let body = d.get_ok("conf.localhost", "/").await;
    assert_eq!(kv(&body, "boot_id"), boot, "woken from S3, not rebooted");
    let disk = d.get_ok("conf.localhost", "/disk/read?name=a").await;
    assert_eq!(kv(&disk, "value"), "kept");
    assert!(
        !d.daemon_log().contains("readable by other users"),
        "a 0600 file draws no warning"
    );
}

/// Without S3 a suspended VM with a local copy still wakes on a request;
/// one without says why it cannot (`wake_failed`, storage unavailable),
/// never `vm_not_running`.
#[tokio::test]
async fn without_s3_a_local_copy_wakes_and_a_missing_one_is_explained() {
    let garage = Garage::start().await;
    let mut d = Daemon::start_with_env(garage.env()).await;
    let (a, boot_a) = d.boot_routed("local").await;
    let (b, _) = d.boot_routed("remote").await;
    d.get_ok("local.localhost", "/counter").await;
    suspend(&d, &a).await;
    let sid_b = suspend(&d, &b).await;

    d.kill_daemon();
    std::fs::remove_dir_all(d.data_dir.path().join("snapshots").join(&sid_b)).unwrap();
    for var in S3_VARS {
        d.remove_env(var);
    }
    d.start_again().await;

    let body = d.get_ok("local.localhost", "/").await;
    assert_eq!(kv(&body, "boot_id"), boot_a);
    let counter = d.get_ok("local.localhost", "/counter").await;
    assert_eq!(kv(&counter, "counter"), "2", "memory kept");

    let (status, body) = d.proxy_get("remote.localhost", "/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let err: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["code"], "wake_failed", "{body}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("snapshot storage is unavailable"),
        "{body}"
    );
    assert_eq!(d.vm(&b).await["state"], "snapshotted", "still restorable");
    // The API says the same for an explicit restore.
    let (s, e) = d
        .call(Method::POST, &format!("/vms/{b}/restore"), None)
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{e}");
    assert_eq!(e["error"]["code"], "snapshot_storage_unavailable");
}

/// A request that reaches a VM while it boots waits for its app (no S3,
/// so nothing could wake it: without the hold it would be refused), and
/// names work wherever ids do.
#[tokio::test]
async fn a_request_to_a_booting_vm_waits_for_its_app_and_names_work_like_ids() {
    let d = Daemon::start().await;
    let vm = d.create_vm(json!({ "name": "early" })).await;
    let id = vm["id"].as_str().unwrap().to_string();
    assert_eq!(vm["ready"], false);
    let (s, route) = d
        .call(
            Method::POST,
            "/routes",
            Some(json!({ "hostname": "early.localhost", "vm_id": "early" })),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{route}");
    assert_eq!(route["vm_id"], id.as_str(), "the name was resolved");

    let body = d.get_ok("early.localhost", "/").await;
    assert!(!kv(&body, "boot_id").is_empty());
    let vm = d.vm("early").await;
    assert_eq!(vm["id"], id.as_str());
    assert_eq!(
        (vm["state"].as_str(), vm["ready"].as_bool()),
        (Some("running"), Some(true))
    );
    assert!(vm["boot_ms"].as_u64().is_some(), "{vm}");

    let (s, e) = d.call(Method::GET, "/vms/no-such-vm", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'no-such-vm'"),
        "{e}"
    );
    let (s, logs) = d.call(Method::GET, "/vms/early/events", None).await;
    assert_eq!(s, StatusCode::OK, "{logs}");
    let (s, _) = d
        .call(Method::DELETE, "/routes/early.localhost", None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, routes) = d.call(Method::GET, "/routes", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(routes["routes"], json!([]));
    let (s, _) = d.call(Method::DELETE, "/vms/early", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn seconds(rfc3339: &Value) -> u64 {
    humantime::parse_rfc3339(rfc3339.as_str().unwrap())
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The idle clock starts no earlier than the route that sets the timeout;
/// the VM shows the timeout that applies (the longest) and its route; a new
/// VM keeps its last 5 snapshots unless told otherwise.
#[tokio::test]
async fn idle_timeouts_start_at_the_route_and_retention_has_a_default() {
    const IDLE: u64 = 5;
    let garage = Garage::start().await;
    let d = Daemon::start_with_env(garage.env()).await;
    let id = d.create_vm(json!({ "name": "idler" })).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Idle since it started running, for longer than the timeout.
    let vm = d.wait_state(&id, "running").await;
    let idle_since = seconds(&vm["started_at"]);
    while now() < idle_since + IDLE + 2 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    let (s, route) = d
        .call(
            Method::POST,
            "/routes",
            Some(
                json!({ "hostname": "idler.localhost", "vm_id": id, "idle_timeout_seconds": IDLE }),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{route}");
    let vm = d.vm(&id).await;
    assert_eq!(vm["idle_timeout_seconds"], IDLE);
    assert_eq!(vm["idle_timeout_route"], "idler.localhost");

    let vm = d.wait_state(&id, "snapshotted").await;
    let (_, snaps) = d
        .call(Method::GET, &format!("/vms/{id}/snapshots"), None)
        .await;
    let snap = &snaps["snapshots"][0];
    assert_eq!(snap["trigger"], "idle", "{snaps}");
    // Whole seconds on both sides: at least IDLE - 1 apart.
    let gap = seconds(&snap["created_at"]) - seconds(&route["created_at"]);
    assert!(
        gap + 1 >= IDLE,
        "suspended {gap} s after the route was made ({vm})"
    );

    // A second route with a longer timeout: it applies, and says so.
    let (s, _) = d
        .call(
            Method::POST,
            "/routes",
            Some(json!({ "hostname": "idler2.localhost", "vm_id": "idler", "idle_timeout_seconds": 600 })),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let vm = d.vm("idler").await;
    assert_eq!(vm["idle_timeout_seconds"], 600);
    assert_eq!(vm["idle_timeout_route"], "idler2.localhost");

    let (s, policy) = d
        .call(Method::GET, &format!("/vms/{id}/retention"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(policy, json!({ "keep_last": 5, "max_age_seconds": null }));
    let (s, _) = d
        .call(Method::PUT, "/vms/idler/retention", Some(json!({})))
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, policy) = d.call(Method::GET, "/vms/idler/retention", None).await;
    assert_eq!(
        policy,
        json!({ "keep_last": null, "max_age_seconds": null })
    );
}

/// `start` wakes a suspended VM; `stop` of a suspended VM discards its
/// memory and keeps its disk; a request through an auto-wake route starts a
/// stopped VM; the host port of a guest port stays the same throughout.
#[tokio::test]
async fn start_and_stop_of_a_suspended_vm_and_autostart_keep_disk_and_ports() {
    let garage = Garage::start().await;
    let d = Daemon::start_with_env(garage.env()).await;
    let (id, boot) = d.boot_routed("sleeper").await;
    let port = host_port(&d.vm(&id).await, 8080);
    d.get_ok("sleeper.localhost", "/disk/write?name=k&value=v1")
        .await;
    suspend(&d, &id).await;

    let (s, vm) = d.call(Method::POST, "/vms/sleeper/start", None).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{vm}");
    let vm = d.wait_state(&id, "running").await;
    assert_eq!(host_port(&vm, 8080), port, "same host port after a wake");
    let body = d.get_ok("sleeper.localhost", "/").await;
    assert_eq!(kv(&body, "boot_id"), boot, "start woke it");
    let metrics = d.metrics_text().await;
    assert!(
        metrics.contains(&format!("hatch_vm_wakes_total{{vm=\"{id}\"}} 1")),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("hatch_vm_last_pause_seconds{{vm=\"{id}\"}}")),
        "{metrics}"
    );

    suspend(&d, &id).await;
    let (s, vm) = d.call(Method::POST, "/vms/sleeper/stop", None).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{vm}");
    assert_eq!(vm["state"], "stopped");

    // The route auto-wakes: the request boots it (its memory is gone).
    let body = d.get_ok("sleeper.localhost", "/").await;
    assert_ne!(kv(&body, "boot_id"), boot, "a new boot");
    let disk = d.get_ok("sleeper.localhost", "/disk/read?name=k").await;
    assert_eq!(kv(&disk, "value"), "v1", "the disk was kept");
    assert_eq!(host_port(&d.vm(&id).await, 8080), port);
    // The snapshots were not changed by the boot: waking from the last
    // one gives the old boot back.
    d.restore(&id, json!({})).await;
    let body = d.get_ok("sleeper.localhost", "/").await;
    assert_eq!(kv(&body, "boot_id"), boot);
}

/// Two forks of one snapshot run side by side with the original: the same
/// memory (boot id, counter history), their own ids, names, ports, disks
/// and clocks; one from the local copy, one from S3 alone.
#[tokio::test]
async fn forks_of_one_snapshot_run_side_by_side() {
    let garage = Garage::start().await;
    let mut d = Daemon::start_with_env(garage.env()).await;
    let (orig, boot) = d.boot_routed("orig").await;
    for _ in 0..3 {
        d.get_ok("orig.localhost", "/counter").await;
    }
    d.get_ok("orig.localhost", "/disk/write?name=f&value=base")
        .await;
    let sid = d.snapshot(&orig, false).await;
    d.wait_snapshot(&orig, &sid, "ready").await;

    let started = std::time::Instant::now();
    let f1 = d
        .create_vm(json!({ "name": "fork-one", "from_snapshot": sid }))
        .await;
    let f1 = f1["id"].as_str().unwrap().to_string();
    d.wait_state(&f1, "running").await;
    d.create_route("fork-one.localhost", &f1).await;
    let body = d.get_ok("fork-one.localhost", "/").await;
    eprintln!(
        "fork from the local copy: first response after {:?}",
        started.elapsed()
    );
    assert_eq!(kv(&body, "boot_id"), boot, "the captured guest resumes");
    hatch_e2e::assert_guest_clock(&body, 1.0);

    // The second from S3 alone.
    d.kill_daemon();
    let _ = std::fs::remove_dir_all(d.data_dir.path().join("snapshots"));
    d.start_again().await;
    let (s, e) = d
        .call(
            Method::POST,
            "/vms",
            Some(json!({ "name": "fork-two", "from_snapshot": sid, "memory_mib": 512 })),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    let started = std::time::Instant::now();
    let f2 = d
        .create_vm(json!({ "name": "fork-two", "from_snapshot": sid }))
        .await;
    let f2 = f2["id"].as_str().unwrap().to_string();
    d.wait_state(&f2, "running").await;
    d.create_route("fork-two.localhost", &f2).await;
    let body = d.get_ok("fork-two.localhost", "/").await;
    eprintln!("fork from S3: first response after {:?}", started.elapsed());
    assert_eq!(kv(&body, "boot_id"), boot);

    // Same history, separate futures.
    for host in ["fork-one.localhost", "fork-two.localhost", "orig.localhost"] {
        let c = d.get_ok(host, "/counter").await;
        assert_eq!(kv(&c, "counter"), "4", "{host}");
    }
    d.get_ok("fork-one.localhost", "/disk/write?name=f&value=one")
        .await;
    for (host, want) in [
        ("fork-one.localhost", "one"),
        ("fork-two.localhost", "base"),
        ("orig.localhost", "base"),
    ] {
        let v = d.get_ok(host, "/disk/read?name=f").await;
        assert_eq!(kv(&v, "value"), want, "{host}");
    }
    let vms = d.call(Method::GET, "/vms", None).await.1;
    let ports: std::collections::BTreeSet<u64> = vms["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|vm| host_port(vm, 8080))
        .collect();
    assert_eq!(ports.len(), 3, "each VM its own host port: {vms}");

    // The source can go; the forks keep running on their own files. Its
    // per-VM metrics go with it.
    let sid2 = d.snapshot(&orig, false).await;
    d.wait_snapshot(&orig, &sid2, "ready").await;
    let series = format!("hatch_vm_stored_bytes_total{{vm=\"{orig}\"}}");
    assert!(d.metrics_text().await.contains(&series));
    let (s, _) = d.call(Method::DELETE, "/vms/orig", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(!d.metrics_text().await.contains(&format!("vm=\"{orig}\"")));
    let c = d.get_ok("fork-two.localhost", "/counter").await;
    assert_eq!(kv(&c, "counter"), "5");
    let (s, e) = d
        .call(Method::POST, "/vms", Some(json!({ "from_snapshot": sid })))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{e}");
}

/// A fork that fails leaves a failed fork with the reason and nothing else
/// changed: the source runs on, its snapshot forks fine afterwards.
#[tokio::test]
async fn a_failed_fork_changes_nothing_else() {
    let garage = Garage::start().await;
    let mut env = garage.env();
    env.push(("HATCH_FAULTS".into(), "fork.copied=fail:1".into()));
    let d = Daemon::start_with_env(env).await;
    let (orig, boot) = d.boot_routed("src").await;
    d.get_ok("src.localhost", "/counter").await;
    let sid = d.snapshot(&orig, false).await;
    d.wait_snapshot(&orig, &sid, "ready").await;

    let bad = d
        .create_vm(json!({ "name": "bad-fork", "from_snapshot": sid }))
        .await;
    let vm = d.wait_state(bad["id"].as_str().unwrap(), "failed").await;
    assert!(
        vm["state_reason"]
            .as_str()
            .unwrap()
            .contains(&format!("fork from {sid} failed")),
        "{vm}"
    );
    assert_eq!(kv(&d.get_ok("src.localhost", "/").await, "boot_id"), boot);
    assert_eq!(
        kv(&d.get_ok("src.localhost", "/counter").await, "counter"),
        "2"
    );

    let good = d
        .create_vm(json!({ "name": "good-fork", "from_snapshot": sid }))
        .await;
    let good = good["id"].as_str().unwrap().to_string();
    d.wait_state(&good, "running").await;
    d.create_route("good-fork.localhost", &good).await;
    let c = d.get_ok("good-fork.localhost", "/counter").await;
    assert_eq!(kv(&c, "counter"), "2", "the snapshot's memory");
}
