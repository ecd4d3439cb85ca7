//! Faults around snapshots: S3 outages, corrupt chunks, a daemon killed at
//! any moment. A VM never ends without a restorable state.

#![allow(clippy::unwrap_used)]

use hatch_e2e::{Daemon, Garage, kv};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn app(d: &Daemon, path: &str) -> String {
    let (s, body) = d.proxy_get("app.localhost", path).await;
    assert_eq!(s, StatusCode::OK, "{path}: {body}");
    body
}

#[tokio::test]
async fn s3_outage_during_upload_keeps_the_vm_restorable_and_a_retry_succeeds() {
    let mut garage = Garage::start().await;
    let mut env = garage.env();
    env.push(("HATCH_UPLOAD_RETRY_MAX_SECONDS".into(), "2".into()));
    let d = Daemon::start_with_env(env).await;
    let (id, boot_id) = d.boot_routed("app").await;
    assert_eq!(app(&d, "/counter").await, "counter=1\n");

    garage.stop();
    let sid = d.snapshot(&id, true).await;
    d.wait_state(&id, "snapshotted").await;
    // The upload fails and is retried; the snapshot stays `uploading` with
    // the reason, never `failed`.
    let snap = wait_snapshot_error(&d, &id, &sid).await;
    assert_eq!(snap["status"], "uploading", "{snap}");
    let err = snap["error"].as_str().unwrap();
    assert!(
        err.contains("upload attempt") && err.contains("local copy stays restorable"),
        "{snap}"
    );
    let (_, storage) = d.call(Method::GET, "/storage", None).await;
    assert_eq!(storage["uploads"]["queued"], 1, "{storage}");
    assert!(
        storage["uploads"]["retries"].as_u64().unwrap() >= 1,
        "{storage}"
    );
    assert!(
        storage["uploads"]["last_error"]
            .as_str()
            .unwrap()
            .contains(&sid),
        "{storage}"
    );
    assert!(
        d.metrics_text()
            .await
            .contains("hatch_upload_attempts_total{result=\"failed\"}")
    );

    // The local copy wakes the VM although S3 is down.
    d.restore(&id, json!({})).await;
    assert_eq!(kv(&app(&d, "/").await, "boot_id"), boot_id);
    assert_eq!(app(&d, "/counter").await, "counter=2\n");

    // S3 is back: the pending upload finishes on its own, with no call.
    garage.restart().await;
    let snap = d.wait_snapshot(&id, &sid, "ready").await;
    assert!(snap.get("error").is_none(), "{snap}");

    // And it restores from S3 alone: the state of that suspend.
    let second = d.snapshot(&id, true).await;
    d.wait_snapshot(&id, &second, "ready").await;
    d.wait_state(&id, "snapshotted").await;
    d.wipe_local_snapshots(&id);
    d.restore(&id, json!({ "snapshot_id": sid })).await;
    assert_eq!(kv(&app(&d, "/").await, "boot_id"), boot_id);
    assert_eq!(app(&d, "/counter").await, "counter=2\n");
}

/// Wait until the snapshot reports an error (a failed upload attempt).
async fn wait_snapshot_error(d: &Daemon, vm: &str, sid: &str) -> Value {
    let deadline = tokio::time::Instant::now() + hatch_e2e::PATIENCE;
    loop {
        let (_, snap) = d
            .call(Method::GET, &format!("/vms/{vm}/snapshots/{sid}"), None)
            .await;
        if snap.get("error").is_some() {
            return snap;
        }
        assert!(tokio::time::Instant::now() < deadline, "no error: {snap}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn s3_outage_during_restore_fails_clearly_and_a_later_restore_works() {
    let mut garage = Garage::start().await;
    let d = Daemon::start_with_env(garage.env()).await;
    let (id, boot_id) = d.boot_routed("app").await;
    assert_eq!(app(&d, "/counter").await, "counter=1\n");
    let sid = d.snapshot(&id, true).await;
    d.wait_snapshot(&id, &sid, "ready").await;
    d.wait_state(&id, "snapshotted").await;
    d.wipe_local_snapshots(&id);

    garage.stop();
    let (s, _) = d
        .call(Method::POST, &format!("/vms/{id}/restore"), Some(json!({})))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    // While the restore runs (S3 requests are being retried), every other
    // operation on the VM is refused.
    for (method, path) in [
        (Method::POST, format!("/vms/{id}/restore")),
        (Method::POST, format!("/vms/{id}/snapshot")),
        (Method::POST, format!("/vms/{id}/start")),
        (Method::DELETE, format!("/vms/{id}")),
    ] {
        let (s, b) = d.call(method.clone(), &path, Some(json!({}))).await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (StatusCode::CONFLICT, Some("conflict")),
            "{method} {path}: {b}"
        );
    }
    let vm = d.wait_state(&id, "snapshotted").await;
    let reason = vm["state_reason"].as_str().unwrap();
    assert!(
        reason.contains("restore of") && reason.contains("manifest"),
        "{vm}"
    );
    assert!(d.qemu_pids().is_empty(), "a failed restore leaves no QEMU");

    garage.restart().await;
    d.restore(&id, json!({})).await;
    assert_eq!(kv(&app(&d, "/").await, "boot_id"), boot_id);
    assert_eq!(app(&d, "/counter").await, "counter=2\n");
}

/// A wake takes the snapshot's RAM image instead of copying it; a wake that
/// fails must give the image back, or the local copy would be lost.
#[tokio::test]
async fn a_failed_wake_gives_the_local_copy_back() {
    let mut garage = Garage::start().await;
    let d = Daemon::start_with_env(garage.env()).await;
    let (id, boot_id) = d.boot_routed("app").await;
    assert_eq!(app(&d, "/counter").await, "counter=1\n");
    let sid = d.snapshot(&id, true).await;
    d.wait_snapshot(&id, &sid, "ready").await;
    d.wait_state(&id, "snapshotted").await;

    // Break the saved device state, and take S3 away: only the local copy
    // can restore this VM.
    let good = d.break_local_state(&sid);
    garage.stop();
    let (s, b) = d
        .call(Method::POST, &format!("/vms/{id}/restore"), Some(json!({})))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let vm = d.wait_state(&id, "snapshotted").await;
    let reason = vm["state_reason"].as_str().unwrap();
    assert!(reason.contains(&format!("restore of {sid} failed")), "{vm}");
    assert!(d.qemu_pids().is_empty(), "a failed wake leaves no QEMU");

    d.repair_local_state(&sid, good);
    d.restore(&id, json!({})).await;
    assert_eq!(kv(&app(&d, "/").await, "boot_id"), boot_id);
    assert_eq!(app(&d, "/counter").await, "counter=2\n");
}

#[tokio::test]
async fn a_corrupt_chunk_is_detected_and_an_older_snapshot_still_restores() {
    let garage = Garage::start().await;
    let mut env = garage.env();
    env.push(("HATCH_LAZY_FILL_TIMEOUT_SECONDS".into(), "3".into()));
    let d = Daemon::start_with_env(env).await;
    let (id, boot_id) = d.boot_routed("app").await;
    assert_eq!(app(&d, "/counter").await, "counter=1\n");
    let old = d.snapshot(&id, false).await;
    d.wait_snapshot(&id, &old, "ready").await;
    assert_eq!(app(&d, "/counter").await, "counter=2\n");
    let new = d.snapshot(&id, true).await;
    d.wait_snapshot(&id, &new, "ready").await;
    d.wait_state(&id, "snapshotted").await;

    // Overwrite, in S3, a memory chunk that only the newer snapshot has.
    let chunks = |m: &Value| -> Vec<String> {
        m["memory"]["chunks"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c.as_str().map(String::from))
            .collect()
    };
    let old_chunks = chunks(&garage.manifest(&id, &old).await);
    let victim = chunks(&garage.manifest(&id, &new).await)
        .into_iter()
        .find(|c| !old_chunks.contains(c))
        .expect("the newer snapshot has a chunk of its own");
    garage.corrupt_chunk(&victim).await;

    d.wipe_local_snapshots(&id);
    let (s, _) = d
        .call(
            Method::POST,
            &format!("/vms/{id}/restore"),
            Some(json!({ "snapshot_id": new })),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    // The memory is served lazily: the bad chunk is found while the guest
    // wakes (it needs it, or the background fetch reaches it first: the
    // wake fails, the vm stays snapshotted) or after (the vm runs on, its
    // state says why, and a suspend fails rather than keep a hole).
    let vm = loop {
        let vm = d.vm(&id).await;
        let reason = vm["state_reason"].as_str().unwrap_or_default();
        if matches!(vm["state"].as_str(), Some("snapshotted" | "running"))
            && reason.starts_with("snapshot_corrupt")
        {
            break vm;
        }
        assert_ne!(vm["state"], "failed", "{vm}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let reason = vm["state_reason"].as_str().unwrap();
    assert!(reason.contains(&victim), "the bad chunk is named: {reason}");
    if vm["state"] == "running" {
        let sid = d.snapshot(&id, true).await;
        let snap = d.wait_snapshot(&id, &sid, "failed").await;
        assert!(snap["error"].as_str().unwrap().contains(&victim), "{snap}");
    }

    // The older snapshot is intact and restores.
    d.restore(&id, json!({ "snapshot_id": old })).await;
    assert_eq!(kv(&app(&d, "/").await, "boot_id"), boot_id);
    assert_eq!(app(&d, "/counter").await, "counter=2\n");
}

#[tokio::test]
async fn a_daemon_killed_right_after_a_suspend_request_leaves_the_vm_restorable() {
    let garage = Garage::start().await;
    let mut d = Daemon::start_with_env(garage.env()).await;
    let (id, boot_id) = d.boot_routed("app").await;
    assert_eq!(app(&d, "/counter").await, "counter=1\n");
    let sid = d.snapshot(&id, true).await;
    // Killed wherever the snapshot is: capturing, keeping RAM, uploading, done.
    d.kill_daemon();
    d.restart().await;

    let vm = d.vm(&id).await;
    match vm["state"].as_str().unwrap() {
        // Interrupted before QEMU ended: the guest runs on.
        "running" => {}
        "snapshotted" => {
            let (_, snap) = d
                .call(Method::GET, &format!("/vms/{id}/snapshots/{sid}"), None)
                .await;
            if snap["status"] != "failed" {
                d.wait_snapshot(&id, &sid, "ready").await;
            }
            d.restore(&id, json!({})).await;
        }
        other => panic!("vm is {other} after the restart: {vm}\n{}", d.daemon_log()),
    }
    assert_eq!(kv(&app(&d, "/").await, "boot_id"), boot_id);
    assert_eq!(app(&d, "/counter").await, "counter=2\n");
}

/// A capture fails in its pause right after switching the disk to a new
/// layer (`fault`), and QEMU cannot be asked for the chain it writes to.
/// The guest runs on; its next boot must use the new layer, with what was
/// written to it, and not write into the layer the VM's snapshots hold.
async fn a_failed_switch_is_recorded_without_qemu(stop: bool, fault: &str) {
    let garage = Garage::start().await;
    let mut env = garage.env();
    // A suspend switches its disk only when it keeps its QEMU warm.
    env.push(("HATCH_STANDBY_QEMUS".into(), "1".into()));
    env.push((
        "HATCH_FAULTS".into(),
        format!("{fault}=fail:1,disk_chain.read=fail"),
    ));
    let d = Daemon::start_with_env(env).await;
    let (id, _) = d.boot_routed("app").await;
    app(&d, "/disk/write?name=a&value=1").await;
    let sid = d.snapshot(&id, stop).await;
    d.wait_snapshot(&id, &sid, "failed").await;
    d.wait_state(&id, "running").await;
    app(&d, "/disk/write?name=b&value=2").await;

    // QEMU dies; a start boots the disk the daemon recorded.
    let pids = d.qemu_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    hatch_e2e::kill_pid(pids[0]);
    d.wait_state(&id, "failed").await;
    let (s, body) = d
        .call(Method::POST, &format!("/vms/{id}/start"), None)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{body}");
    d.wait_state(&id, "running").await;
    d.wait_http("app.localhost", "/").await;
    assert_eq!(app(&d, "/disk/read?name=a").await, "value=1\n");
    assert_eq!(app(&d, "/disk/read?name=b").await, "value=2\n");
}

#[tokio::test]
async fn a_warm_suspend_failed_after_its_disk_switch_records_the_new_layer_without_qemu() {
    a_failed_switch_is_recorded_without_qemu(true, "suspend.disk_switched").await;
}

#[tokio::test]
async fn a_checkpoint_failed_after_its_disk_switch_records_the_new_layer_without_qemu() {
    a_failed_switch_is_recorded_without_qemu(false, "checkpoint.layer_switched").await;
}
