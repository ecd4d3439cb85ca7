//! Snapshots against a real Garage: suspend and wake, checkpoint and
//! rollback, restore from S3 alone; memory, CPU and disk state survive.

#![allow(clippy::unwrap_used)]

use hatch_e2e::{Daemon, Garage, kv, process_alive};
use reqwest::{Method, StatusCode};
use serde_json::json;

async fn get(d: &Daemon, path: &str) -> String {
    let (s, body) = d.proxy_get("app.localhost", path).await;
    assert_eq!(s, StatusCode::OK, "{path}: {body}");
    body
}

#[tokio::test]
async fn suspend_wake_checkpoint_rollback_and_restore_from_s3_keep_state() {
    let garage = Garage::start().await;
    let d = Daemon::start_with_env(garage.env()).await;
    let vm = d.create_vm(json!({ "name": "app" })).await;
    let id = vm["id"].as_str().unwrap().to_string();
    d.wait_state(&id, "running").await;
    // This test drives wakes through the API; the proxy must not wake the VM.
    let body = json!({ "hostname": "app.localhost", "vm_id": id, "auto_wake": false });
    let (s, r) = d.call(Method::POST, "/routes", Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    let boot_id = kv(&d.wait_http("app.localhost", "/").await, "boot_id");
    assert_eq!(get(&d, "/counter").await, "counter=1\n");
    assert_eq!(get(&d, "/disk/write?name=k&value=v1").await, "ok\n");

    // Nothing to restore yet; a running VM cannot be "woken" from nothing.
    let (s, b) = d
        .call(Method::POST, &format!("/vms/{id}/restore"), Some(json!({})))
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("conflict"))
    );

    // Suspend: QEMU ends, the VM is snapshotted, the snapshot reaches S3.
    let pid = d.qemu_pids()[0];
    let s1 = d.snapshot(&id, true).await;
    d.wait_state(&id, "snapshotted").await;
    assert!(!process_alive(pid));
    let snap = d.wait_snapshot(&id, &s1, "ready").await;
    assert!(snap["pause_ms"].as_u64().is_some(), "{snap}");
    assert!(snap["stored_bytes"].as_u64().unwrap() > 0, "{snap}");
    assert_eq!(snap["memory_bytes"], 256u64 << 20);
    assert_eq!(snap["trigger"], "manual");
    assert_eq!(snap["vm_id"], id.as_str());
    let (s, b) = d.proxy_get("app.localhost", "/").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    let (s, _) = d
        .call(
            Method::POST,
            &format!("/vms/{id}/snapshot"),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::CONFLICT,
        "a snapshotted vm cannot be snapshotted"
    );

    // Let wall-clock time pass while the VM is suspended: its clock stands
    // still meanwhile, and the restore must put it right.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;

    // Wake: same boot, counter and disk continue; the clock is right again.
    d.restore(&id, json!({})).await;
    let root = get(&d, "/").await;
    assert_eq!(kv(&root, "boot_id"), boot_id, "a restore is not a reboot");
    hatch_e2e::assert_guest_clock(&root, 1.0);
    assert!(!d.daemon_log().contains("not synced"), "{}", d.daemon_log());
    assert_eq!(get(&d, "/counter").await, "counter=2\n");
    assert_eq!(get(&d, "/disk/read?name=k").await, "value=v1\n");

    // Checkpoint: the VM runs on; later changes are rolled back.
    let s2 = d.snapshot(&id, false).await;
    let snap = d.wait_snapshot(&id, &s2, "ready").await;
    assert!(snap["pause_ms"].as_u64().is_some());
    assert_eq!(d.vm(&id).await["state"], "running");
    assert_eq!(get(&d, "/counter").await, "counter=3\n");
    assert_eq!(get(&d, "/disk/write?name=k&value=v2").await, "ok\n");
    assert_eq!(get(&d, "/disk/write?name=later&value=x").await, "ok\n");
    d.restore(&id, json!({ "snapshot_id": s2 })).await;
    assert_eq!(kv(&get(&d, "/").await, "boot_id"), boot_id);
    assert_eq!(
        get(&d, "/counter").await,
        "counter=3\n",
        "counter rolled back to the checkpoint"
    );
    assert_eq!(
        get(&d, "/disk/read?name=k").await,
        "value=v1\n",
        "disk rolled back"
    );
    let (s, _) = d.proxy_get("app.localhost", "/disk/read?name=later").await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Listing: newest first.
    let (_, list) = d
        .call(Method::GET, &format!("/vms/{id}/snapshots"), None)
        .await;
    let ids: Vec<&str> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [s2.as_str(), s1.as_str()]);

    // Suspend again, then wipe every local copy: the restore comes from S3 only.
    assert_eq!(get(&d, "/counter").await, "counter=4\n");
    let s3 = d.snapshot(&id, true).await;
    d.wait_snapshot(&id, &s3, "ready").await;
    d.wait_state(&id, "snapshotted").await;
    d.wipe_local_snapshots(&id);
    d.restore(&id, json!({})).await;
    assert_eq!(kv(&get(&d, "/").await, "boot_id"), boot_id);
    assert_eq!(get(&d, "/counter").await, "counter=5\n");
    assert_eq!(get(&d, "/disk/read?name=k").await, "value=v1\n");
}

/// The qcow2 files of the running VM's disk chain (active layer first), as
/// QEMU opened them.
fn disk_chain(d: &Daemon) -> Vec<String> {
    let pid = d.qemu_pids()[0];
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let active = String::from_utf8_lossy(&cmdline)
        .split(['\0', ','])
        .find_map(|a| a.strip_prefix("file.filename=").map(str::to_string))
        .unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--backing-chain", "--output=json", &active])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let chain: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    chain
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["filename"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn repeated_wakes_keep_the_disk_chain_short_and_the_data_intact() {
    let garage = Garage::start().await;
    let mut env = garage.env();
    env.push(("HATCH_MAX_DISK_LAYERS".into(), "2".into()));
    let d = Daemon::start_with_env(env).await;
    let id = d.create_vm(json!({ "name": "app" })).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    d.wait_state(&id, "running").await;
    let body = json!({ "hostname": "app.localhost", "vm_id": id, "auto_wake": false });
    assert_eq!(
        d.call(Method::POST, "/routes", Some(body)).await.0,
        StatusCode::CREATED
    );
    let boot_id = kv(&d.wait_http("app.localhost", "/").await, "boot_id");

    // Each suspend freezes a layer and each wake adds one.
    for i in 1..=4 {
        let w = format!("/disk/write?name=k{i}&value=v{i}");
        assert_eq!(get(&d, &w).await, "ok\n");
        let sid = d.snapshot(&id, true).await;
        d.wait_snapshot(&id, &sid, "ready").await;
        d.wait_state(&id, "snapshotted").await;
        d.restore(&id, json!({})).await;
    }
    // Past two layers the chain is flattened, live: the active layer sits
    // directly on the image's base disk.
    let deadline = tokio::time::Instant::now() + hatch_e2e::PATIENCE;
    loop {
        let chain = disk_chain(&d);
        if chain.len() == 2 {
            assert!(chain[1].ends_with(".raw"), "{chain:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never compacted: {chain:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for i in 1..=4 {
        assert_eq!(
            get(&d, &format!("/disk/read?name=k{i}")).await,
            format!("value=v{i}\n")
        );
    }
    assert_eq!(kv(&get(&d, "/").await, "boot_id"), boot_id);

    // A snapshot of the flattened disk restores from S3 alone.
    assert_eq!(get(&d, "/disk/write?name=k5&value=v5").await, "ok\n");
    let sid = d.snapshot(&id, true).await;
    d.wait_snapshot(&id, &sid, "ready").await;
    d.wait_state(&id, "snapshotted").await;
    d.wipe_local_snapshots(&id);
    d.restore(&id, json!({ "snapshot_id": sid })).await;
    for i in 1..=5 {
        assert_eq!(
            get(&d, &format!("/disk/read?name=k{i}")).await,
            format!("value=v{i}\n")
        );
    }
    assert_eq!(kv(&get(&d, "/").await, "boot_id"), boot_id);
}

/// Checkpoints taken while a client keeps changing the guest's memory (a
/// counter) and its disk (the counter's last value, written durably after
/// each increment): a rollback to each finds memory and disk from one
/// moment, the disk at most one step behind the memory, never ahead.
#[tokio::test]
async fn checkpoints_under_writes_roll_back_to_one_consistent_moment() {
    let garage = Garage::start().await;
    let d = Daemon::start_with_env(garage.env()).await;
    let (id, boot_id) = d.boot_routed("app").await;
    let proxy = d.proxy_addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let get = |path: String| {
                let client = client.clone();
                async move {
                    let r = client
                        .get(format!("http://{proxy}{path}"))
                        .header("host", "app.localhost")
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), StatusCode::OK);
                    r.text().await.unwrap()
                }
            };
            let mut rounds = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let n = kv(&get("/counter".into()).await, "counter");
                get(format!("/disk/write?name=last&value={n}")).await;
                rounds += 1;
            }
            rounds
        })
    };
    let mut checkpoints = Vec::new();
    for _ in 0..2 {
        let sid = d.snapshot(&id, false).await;
        d.wait_snapshot(&id, &sid, "ready").await;
        checkpoints.push(sid);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = writer.await.unwrap();
    assert!(rounds > 0, "the writer never ran");

    for sid in &checkpoints {
        d.restore(&id, json!({ "snapshot_id": sid })).await;
        assert_eq!(kv(&get(&d, "/").await, "boot_id"), boot_id);
        // The counter the checkpoint held, plus this request.
        let counter: u64 = kv(&get(&d, "/counter").await, "counter").parse().unwrap();
        let (s, body) = d.proxy_get("app.localhost", "/disk/read?name=last").await;
        let last: u64 = match s {
            StatusCode::OK => kv(&body, "value").parse().unwrap(),
            // Checkpointed before the first disk write completed.
            StatusCode::NOT_FOUND => 0,
            other => panic!("disk read: {other} {body}"),
        };
        assert!(
            last + 1 == counter - 1 || last == counter - 1,
            "{sid}: memory says {} and disk {last}: not one moment",
            counter - 1
        );
    }
}
