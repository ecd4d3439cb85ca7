//! What read back from S3 or the data dir is not trusted; a hung QEMU is
//! killed; one VM's failed recovery does not stop the others; a rollback
//! that cannot get its snapshot leaves the VM as it was; the guest's clock
//! is right after every wake, also a herd of them.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hatch_e2e::{Daemon, Garage, assert_guest_clock, kv};
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjPath;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const SECRET: &str = "e2e-snapshot-secret-0123456789";

fn env_with_secret(garage: &Garage) -> Vec<(String, String)> {
    let mut env = garage.env();
    env.push(("HATCH_SNAPSHOT_SECRET".into(), SECRET.into()));
    env
}

/// Reseal a manifest body the way the daemon does (keyed BLAKE3 with a key
/// derived from the shared secret): what someone who holds the secret, or
/// a daemon with a bug, could write.
fn seal(body: &str) -> Value {
    let key = blake3::derive_key("hatch 2026-11-29 snapshot seal MAC key", SECRET.as_bytes());
    let id = blake3::derive_key("hatch 2026-11-29 snapshot seal key id", SECRET.as_bytes());
    let key_id: String = id[..8].iter().map(|b| format!("{b:02x}")).collect();
    json!({
        "format": "hatch.snapshot-manifest",
        "version": 2,
        "key_id": key_id,
        "mac": blake3::keyed_hash(&key, body.as_bytes()).to_hex().to_string(),
        "manifest": serde_json::from_str::<Value>(body).unwrap(),
    })
}

fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn a_forged_or_hostile_manifest_is_refused_and_nothing_is_written() {
    let garage = Garage::start().await;
    let d = Daemon::start_with_env(env_with_secret(&garage)).await;
    let (id, boot) = d.boot_routed("m").await;
    assert_eq!(d.get_ok("m.localhost", "/counter").await, "counter=1\n");
    let sid = d.snapshot(&id, true).await;
    d.wait_snapshot(&id, &sid, "ready").await;
    d.wait_state(&id, "snapshotted").await;
    d.wipe_local_snapshots(&id);

    let bucket = garage.bucket();
    let key = ObjPath::from(format!("manifests/{id}/{sid}.json"));
    let original = bucket.get(&key).await.unwrap().bytes().await.unwrap();
    let envelope: Value = serde_json::from_slice(&original).unwrap();
    let body = serde_json::to_string(&envelope["manifest"]).unwrap();
    let first_layer = envelope["manifest"]["disk_layers"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let escape = "../../../../../../tmp/hatch-e2e-pwned.qcow2";
    let _ = std::fs::remove_file("/tmp/hatch-e2e-pwned.qcow2");

    let cases = [
        (
            "edited without the secret",
            serde_json::to_vec(&json!({
                "format": envelope["format"], "version": 2,
                "key_id": envelope["key_id"], "mac": envelope["mac"],
                "manifest": serde_json::from_str::<Value>(
                    &body.replace(&first_layer, escape)).unwrap(),
            }))
            .unwrap(),
            "not authentic",
        ),
        (
            "sealed, with a layer name outside the vm",
            serde_json::to_vec(&seal(&body.replace(&first_layer, escape))).unwrap(),
            "disk layer name",
        ),
        (
            "sealed, with memory larger than the vm's",
            serde_json::to_vec(&seal(&body.replace(
                &format!("\"len\":{}", 256u64 << 20),
                &format!("\"len\":{}", 1u64 << 40),
            )))
            .unwrap(),
            "memory",
        ),
        (
            "not a manifest",
            b"{\"checksum\":\"x\"}".to_vec(),
            "malformed",
        ),
    ];
    let before = files_under(d.data_dir.path());
    for (what, bytes, expect) in cases {
        bucket
            .put(&key, bytes::Bytes::from(bytes).into())
            .await
            .unwrap();
        d.start_restore(&id, json!({})).await;
        let vm = d.wait_state(&id, "snapshotted").await;
        let reason = vm["state_reason"].as_str().unwrap_or_default();
        assert!(
            reason.starts_with("snapshot_corrupt") && reason.contains(expect),
            "{what}: {vm}"
        );
        assert!(d.qemu_pids().is_empty(), "{what}: no QEMU was started");
        // Nothing written: no file outside, no new file in the data dir
        // (but the log).
        assert!(!std::path::Path::new("/tmp/hatch-e2e-pwned.qcow2").exists());
        let after: Vec<String> = files_under(d.data_dir.path())
            .into_iter()
            .filter(|f| !f.ends_with("daemon.log") && !f.contains("hatch.db"))
            .collect();
        let before: Vec<String> = before
            .iter()
            .filter(|f| !f.ends_with("daemon.log") && !f.contains("hatch.db"))
            .cloned()
            .collect();
        assert_eq!(after, before, "{what}: files changed");
    }

    // The genuine manifest still restores.
    bucket.put(&key, original.into()).await.unwrap();
    d.restore(&id, json!({})).await;
    assert_eq!(kv(&d.get_ok("m.localhost", "/").await, "boot_id"), boot);
    assert_eq!(d.get_ok("m.localhost", "/counter").await, "counter=2\n");
}

#[tokio::test]
async fn a_tampered_local_copy_is_not_used() {
    let mut garage = Garage::start().await;
    let d = Daemon::start_with_env(env_with_secret(&garage)).await;
    let (id, boot) = d.boot_routed("t").await;
    assert_eq!(d.get_ok("t.localhost", "/counter").await, "counter=1\n");
    let sid = d.snapshot(&id, true).await;
    d.wait_snapshot(&id, &sid, "ready").await;
    d.wait_state(&id, "snapshotted").await;

    // The RAM image loses its tail (a crash, a full disk, a person).
    let mem = d.data_dir.path().join("snapshots").join(&sid).join("mem");
    let len = std::fs::metadata(&mem).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&mem)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    // Without S3 it cannot be restored, and says why.
    garage.stop();
    d.start_restore(&id, json!({})).await;
    let vm = d.wait_state(&id, "snapshotted").await;
    let reason = vm["state_reason"].as_str().unwrap();
    assert!(
        reason.contains("the local copy cannot be used (the RAM image"),
        "{vm}"
    );
    assert!(d.qemu_pids().is_empty(), "no guest ran on a half RAM image");
    assert_eq!(
        std::fs::metadata(&mem).unwrap().len(),
        len / 2,
        "the copy is left as it was"
    );

    // With S3 it is restored from there.
    garage.restart().await;
    d.restore(&id, json!({})).await;
    assert_eq!(kv(&d.get_ok("t.localhost", "/").await, "boot_id"), boot);
    assert_eq!(d.get_ok("t.localhost", "/counter").await, "counter=2\n");
    // The wake says it could not use its local copy.
    assert_wake_warned(&d, &id, "could not be used (the RAM image").await;
}

/// The newest event of the VM is a wake that worked with a warning.
async fn assert_wake_warned(d: &Daemon, id: &str, warning: &str) {
    let (_, events) = d
        .call(Method::GET, &format!("/vms/{id}/events"), None)
        .await;
    let wake = &events["events"][0];
    assert_eq!(wake["kind"], "wake", "{events}");
    assert!(wake["error"].is_null(), "{events}");
    assert!(
        wake["warnings"][0].as_str().unwrap().contains(warning),
        "{events}"
    );
}

#[tokio::test]
async fn a_rollback_that_cannot_get_its_snapshot_leaves_the_vm_running_unchanged() {
    let mut garage = Garage::start().await;
    let d = Daemon::start_with_env(garage.env()).await;
    let (id, boot) = d.boot_routed("r").await;
    assert_eq!(d.get_ok("r.localhost", "/counter").await, "counter=1\n");
    let sid = d.snapshot(&id, false).await;
    d.wait_snapshot(&id, &sid, "ready").await;
    assert_eq!(d.get_ok("r.localhost", "/counter").await, "counter=2\n");
    d.get_ok("r.localhost", "/disk/write?name=k&value=after")
        .await;

    // The local copy is gone and S3 is down: the snapshot cannot be had.
    std::fs::remove_dir_all(d.data_dir.path().join("snapshots").join(&sid)).unwrap();
    garage.stop();
    let pids = d.qemu_pids();
    d.start_restore(&id, json!({ "snapshot_id": sid })).await;
    let vm = wait_reason(&d, &id).await;
    assert_eq!(vm["state"], "running", "{vm}");
    let reason = vm["state_reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("rollback to {sid} failed")) && reason.contains("unchanged"),
        "{vm}"
    );
    assert_eq!(d.qemu_pids(), pids, "the same QEMU runs on");
    assert_eq!(kv(&d.get_ok("r.localhost", "/").await, "boot_id"), boot);
    assert_eq!(d.get_ok("r.localhost", "/counter").await, "counter=3\n");
    assert_eq!(
        d.get_ok("r.localhost", "/disk/read?name=k").await,
        "value=after\n"
    );
}

async fn wait_reason(d: &Daemon, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + hatch_e2e::PATIENCE;
    loop {
        let vm = d.vm(id).await;
        if vm["state"] != "restoring" && vm.get("state_reason").is_some() {
            return vm;
        }
        assert!(tokio::time::Instant::now() < deadline, "{vm}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_hung_qemu_is_killed_and_the_vm_is_free_again() {
    let garage = Garage::start().await;
    let mut env = garage.env();
    env.push(("HATCH_QMP_TIMEOUT_SECONDS".into(), "2".into()));
    let d = Daemon::start_with_env(env).await;
    let (id, _) = d.boot_routed("h").await;
    let pids = d.qemu_pids();
    assert_eq!(pids.len(), 1);
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pids[0], libc::SIGSTOP);
    }
    d.snapshot(&id, false).await;
    let vm = d.wait_state(&id, "failed").await;
    let reason = vm["state_reason"].as_str().unwrap();
    assert!(reason.contains("stopped answering"), "{vm}");
    assert!(d.qemu_pids().is_empty(), "the hung QEMU was killed");
    // The operation lock was released: the VM can be started again.
    let (s, b) = d
        .call(Method::POST, &format!("/vms/{id}/start"), None)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    d.wait_state(&id, "running").await;
    d.wait_http("h.localhost", "/").await;
}

#[tokio::test]
async fn one_vm_whose_recovery_fails_does_not_keep_the_others_down() {
    let mut d = Daemon::start().await;
    let (bad, _) = d.boot_routed("bad").await;
    let (good, boot) = d.boot_routed("good").await;
    d.set_env("HATCH_FAULTS", Some(&format!("recover@{bad}=fail")));
    d.restart().await;
    let vm = d.vm(&bad).await;
    assert_eq!(vm["state"], "failed", "{vm}");
    assert!(
        vm["state_reason"]
            .as_str()
            .unwrap()
            .contains("recovery after a daemon restart failed: injected fault"),
        "{vm}"
    );
    assert_eq!(d.vm(&good).await["state"], "running");
    assert_eq!(kv(&d.get_ok("good.localhost", "/").await, "boot_id"), boot);
    assert_eq!(d.qemu_pids().len(), 1, "the failed vm's QEMU was stopped");
}

#[tokio::test]
async fn the_clock_is_right_after_a_herd_of_wakes_and_a_wake_without_sync_fails() {
    let garage = Garage::start().await;
    let mut d = Daemon::start_with_env(garage.env()).await;
    let names = ["h1", "h2", "h3", "h4"];
    let mut vms = Vec::new();
    for name in names {
        let id = d.create_vm(json!({ "name": name })).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        vms.push(id);
    }
    let mut boots = Vec::new();
    for (name, id) in names.iter().zip(&vms) {
        d.wait_state(id, "running").await;
        d.create_route(&format!("{name}.localhost"), id).await;
        boots.push(kv(
            &d.wait_http(&format!("{name}.localhost"), "/").await,
            "boot_id",
        ));
    }
    for id in &vms {
        let sid = d.snapshot(id, true).await;
        d.wait_snapshot(id, &sid, "ready").await;
    }
    // Asleep for a while: a guest whose clock were not set would be behind.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The first sync attempt of every VM is lost; the last VM never syncs.
    let faults: Vec<String> = vms[..3]
        .iter()
        .map(|id| format!("agent.sync@{id}=fail:1"))
        .chain([format!("agent.sync@{}=fail", vms[3])])
        .collect();
    d.set_env("HATCH_FAULTS", Some(&faults.join(",")));
    d.set_env("HATCH_AGENT_SYNC_TIMEOUT_SECONDS", Some("5"));
    d.restart().await;

    let wakes = names.iter().map(|name| {
        let (http, proxy) = (d.http.clone(), d.proxy_addr);
        async move {
            let resp = http
                .get(format!("http://{proxy}/"))
                .header("host", format!("{name}.localhost"))
                .send()
                .await
                .unwrap();
            let status = resp.status();
            let body = resp.text().await.unwrap();
            // The guest's clock, against the host's when the answer came.
            let skew = (status == StatusCode::OK).then(|| {
                let host = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs_f64();
                host - kv(&body, "time").parse::<f64>().unwrap()
            });
            (status, body, skew)
        }
    });
    let answers = futures_util::future::join_all(wakes).await;
    for (i, (status, body, skew)) in answers.iter().take(3).enumerate() {
        assert_eq!(*status, StatusCode::OK, "{}: {body}", names[i]);
        assert_eq!(kv(body, "boot_id"), boots[i]);
        let skew = skew.unwrap();
        assert!(
            skew.abs() < 1.0,
            "{}: the guest clock is {skew} s off",
            names[i]
        );
    }
    // Their wakes worked, and their events say what did not go well.
    for id in &vms[..3] {
        assert_wake_warned(&d, id, "only after 2 attempts").await;
    }
    let (status, body, _) = &answers[3];
    assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body.contains("wake_failed") && body.contains("clock"),
        "{body}"
    );
    let vm = d.vm(&vms[3]).await;
    assert_eq!(vm["state"], "snapshotted", "{vm}");
    let (_, events) = d
        .call(Method::GET, &format!("/vms/{}/events", vms[3]), None)
        .await;
    assert!(
        events["events"][0]["error"]
            .as_str()
            .unwrap()
            .contains("clock and RNG sync"),
        "{events}"
    );
    let metrics = d.metrics_text().await;
    assert!(
        metrics.contains("hatch_clock_sync_failures_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("hatch_clock_sync_retries_total"),
        "{metrics}"
    );

    // Once the agent answers, it wakes with its clock right.
    d.set_env("HATCH_FAULTS", None);
    d.restart().await;
    let body = d.get_ok("h4.localhost", "/").await;
    assert_eq!(kv(&body, "boot_id"), boots[3]);
    assert_guest_clock(&body, 1.0);
}

#[tokio::test]
async fn a_real_websocket_client_talks_to_the_guest() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let d = Daemon::start().await;
    d.boot_routed("ws").await;
    let mut req = format!("ws://{}/ws", d.proxy_addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("host", "ws.localhost".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for msg in [
        Message::text("hello"),
        Message::binary(vec![0u8, 1, 2, 255]),
        Message::text("x".repeat(70_000)),
    ] {
        ws.send(msg.clone()).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed, msg);
    }
    ws.close(None).await.unwrap();
}
