//! The daemon killed (SIGKILL, by an injected fault) at every step of a
//! suspend, a checkpoint, an upload, a wake from the local copy, a wake
//! from S3 and a rollback. After a restart the VM is running, or restorable
//! with the state of a completed snapshot: same boot, counter and disk
//! values consistent with exactly one state; never failed, never
//! half-restored. Each test prints the state after every crash and the
//! time to recover.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use hatch_e2e::{Daemon, Garage, kv};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const HOST: &str = "crash.localhost";

async fn app(d: &Daemon, path: &str) -> (StatusCode, String) {
    d.proxy_get(HOST, path).await
}

async fn counter(d: &Daemon) -> u64 {
    let (s, body) = app(d, "/counter").await;
    assert_eq!(s, StatusCode::OK, "{body}\n{}", d.daemon_log());
    kv(&body, "counter").parse().unwrap()
}

async fn boot_id(d: &Daemon) -> String {
    let (s, body) = app(d, "/").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    kv(&body, "boot_id")
}

async fn disk_read(d: &Daemon, name: &str) -> Option<String> {
    let (s, body) = app(d, &format!("/disk/read?name={name}")).await;
    match s {
        StatusCode::OK => Some(kv(&body, "value")),
        StatusCode::NOT_FOUND => None,
        other => panic!("disk read {name}: {other} {body}"),
    }
}

async fn disk_write(d: &Daemon, name: &str, value: &str) {
    let (s, body) = app(d, &format!("/disk/write?name={name}&value={value}")).await;
    assert_eq!(s, StatusCode::OK, "{body}");
}

async fn setup() -> (Garage, Daemon, String, String) {
    setup_with(&[]).await
}

async fn setup_with(extra: &[(&str, &str)]) -> (Garage, Daemon, String, String) {
    let garage = Garage::start().await;
    let mut env = garage.env();
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env.push(("HATCH_UPLOAD_RETRY_MAX_SECONDS".into(), "2".into()));
    // Every checkpoint adds a disk layer; a compaction in the middle would
    // make the next call a 409 (it has its own test).
    env.push(("HATCH_MAX_DISK_LAYERS".into(), "64".into()));
    let d = Daemon::start_with_env(env).await;
    let id = d.create_vm(json!({ "name": "crash" })).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    d.wait_state(&id, "running").await;
    d.create_route(HOST, &id).await;
    d.wait_http(HOST, "/").await;
    let boot = boot_id(&d).await;
    disk_write(&d, "base", "kept").await;
    (garage, d, id, boot)
}

/// Restart the daemon with `HATCH_FAULTS=point` (the VMs keep running).
async fn arm(d: &mut Daemon, point: &str) {
    d.set_env("HATCH_FAULTS", Some(point));
    d.restart().await;
}

/// After the fault killed the daemon: start it without faults and report
/// the VM's state. Fails on any state but running or snapshotted.
async fn crash_and_recover(d: &mut Daemon, id: &str, point: &str) -> (String, Instant) {
    d.wait_for_crash().await;
    d.set_env("HATCH_FAULTS", None);
    let t = Instant::now();
    d.start_again().await;
    let vm = d.vm(id).await;
    let state = vm["state"].as_str().unwrap().to_string();
    assert!(
        state == "running" || state == "snapshotted",
        "after a crash at {point} the vm is {state}: {vm}\n{}",
        d.daemon_log()
    );
    // No snapshot is left half-way.
    let (_, list) = d
        .call(Method::GET, &format!("/vms/{id}/snapshots"), None)
        .await;
    for s in list["snapshots"].as_array().unwrap() {
        assert!(
            ["uploading", "ready", "failed"].contains(&s["status"].as_str().unwrap()),
            "after a crash at {point}: {s}"
        );
    }
    (state, t)
}

/// Bring a snapshotted VM back (restore, default snapshot) and report.
async fn wake(d: &Daemon, id: &str, state: &str) {
    if state == "snapshotted" {
        d.restore(id, json!({})).await;
    }
}

fn report(point: &str, state: &str, t: Instant) {
    eprintln!(
        "crash at {point:<28} -> vm {state:<11} recovered and serving in {} ms",
        t.elapsed().as_millis()
    );
}

async fn wait_ready(d: &Daemon, id: &str, sid: &str) -> Value {
    d.wait_snapshot(id, sid, "ready").await
}

#[tokio::test]
async fn a_crash_at_any_step_of_a_suspend_or_its_upload_loses_nothing() {
    let (_garage, mut d, id, boot) = setup().await;
    let mut n = counter(&d).await;
    for point in [
        "suspend.paused",
        "suspend.state_saved",
        "suspend.qemu_ended",
        "suspend.ram_kept",
        "suspend.recorded",
        "upload.before_manifest",
        "upload.manifest_written",
    ] {
        arm(&mut d, point).await;
        let sid = d.snapshot(&id, true).await;
        let (state, t) = crash_and_recover(&mut d, &id, point).await;
        if point.starts_with("upload") || point == "suspend.recorded" {
            // Captured before the crash: the upload resumes and completes.
            assert_eq!(state, "snapshotted", "{point}");
        }
        if state == "snapshotted" {
            // Awaited, so that the next step starts from a settled VM (see
            // the warm test below).
            wait_ready(&d, &id, &sid).await;
        }
        wake(&d, &id, &state).await;
        assert_eq!(boot_id(&d).await, boot, "{point}: same boot");
        report(point, &state, t);
        n += 1;
        assert_eq!(counter(&d).await, n, "{point}: the counter goes on");
        assert_eq!(disk_read(&d, "base").await.as_deref(), Some("kept"));
    }
}

/// The same with the suspend keeping its QEMU warm (standbys on): a crash
/// between its disk switch and its record leaves a paused QEMU that saved
/// its state; the next daemon ends it and completes the suspend, or resumes
/// it if the state was not saved yet.
#[tokio::test]
async fn a_crash_at_any_step_of_a_suspend_keeping_its_qemu_warm_loses_nothing() {
    let (_garage, mut d, id, boot) = setup_with(&[("HATCH_STANDBY_QEMUS", "2")]).await;
    let mut n = counter(&d).await;
    for point in [
        "suspend.paused",
        "suspend.disk_switched",
        "suspend.state_saved",
        "suspend.qemu_ended",
        "suspend.ram_kept",
        "suspend.recorded",
    ] {
        // Armed while suspended, so that the wake below is a launch of
        // this daemon's own, whose QEMU a suspend keeps warm.
        let sid = d.snapshot(&id, true).await;
        d.wait_state(&id, "snapshotted").await;
        wait_ready(&d, &id, &sid).await;
        arm(&mut d, point).await;
        n += 1;
        assert_eq!(counter(&d).await, n, "{point}: woken before the crash");
        disk_write(&d, point, "before").await;
        let sid = d.snapshot(&id, true).await;
        let (state, t) = crash_and_recover(&mut d, &id, point).await;
        if point == "suspend.recorded" {
            assert_eq!(state, "snapshotted", "{point}");
        }
        if state == "snapshotted" {
            // The completed suspend uploads, and retention (new VMs keep 5)
            // runs under the VM's lock before it shows ready: awaited, so
            // that the next request does not wait behind it.
            wait_ready(&d, &id, &sid).await;
        }
        wake(&d, &id, &state).await;
        report(point, &state, t);
        assert_eq!(boot_id(&d).await, boot, "{point}: same boot");
        n += 1;
        assert_eq!(counter(&d).await, n, "{point}: the counter goes on");
        assert_eq!(disk_read(&d, "base").await.as_deref(), Some("kept"));
        assert_eq!(
            disk_read(&d, point).await.as_deref(),
            Some("before"),
            "{point}"
        );
    }
}

#[tokio::test]
async fn a_crash_at_any_step_of_a_checkpoint_loses_nothing() {
    let (_garage, mut d, id, boot) = setup().await;
    let mut n = counter(&d).await;
    let mut kept = Vec::new();
    for point in [
        "checkpoint.paused",
        "checkpoint.layer_switched",
        "checkpoint.disk_frozen",
        "checkpoint.state_saved",
        "checkpoint.ram_copied",
        "checkpoint.resumed",
        "checkpoint.recorded",
        "upload.before_manifest",
    ] {
        arm(&mut d, point).await;
        let sid = d.snapshot(&id, false).await;
        let (state, t) = crash_and_recover(&mut d, &id, point).await;
        // A checkpoint never ends the guest: it runs on.
        assert_eq!(state, "running", "{point}");
        report(point, &state, t);
        assert_eq!(boot_id(&d).await, boot);
        n += 1;
        assert_eq!(counter(&d).await, n, "{point}");
        disk_write(&d, point, "after").await;
        let (_, snap) = d
            .call(Method::GET, &format!("/vms/{id}/snapshots/{sid}"), None)
            .await;
        if snap["status"] != "failed" {
            // Its files were complete before the crash: kept and uploaded.
            wait_ready(&d, &id, &sid).await;
            kept.push((sid, n));
        }
    }
    assert!(
        !kept.is_empty(),
        "checkpoints completed before a crash are kept"
    );
    // The disk chain survived every crash (one between QEMU switching to
    // a new layer and the record of it): a suspend restored from S3 alone
    // has every value written since.
    let sid = d.snapshot(&id, true).await;
    wait_ready(&d, &id, &sid).await;
    d.wait_state(&id, "snapshotted").await;
    d.wipe_local_snapshots(&id);
    d.restore(&id, json!({ "snapshot_id": sid })).await;
    n += 1;
    assert_eq!(counter(&d).await, n);
    for point in ["checkpoint.layer_switched", "checkpoint.recorded"] {
        assert_eq!(
            disk_read(&d, point).await.as_deref(),
            Some("after"),
            "{point}"
        );
    }
    // A checkpoint kept across a crash rolls back to its own state.
    // (`at` was the first counter read after it was taken.)
    let (sid, at) = kept[0].clone();
    d.restore(&id, json!({ "snapshot_id": sid })).await;
    assert_eq!(counter(&d).await, at);
    assert_eq!(boot_id(&d).await, boot);
}

/// The daemon and QEMU both die in the middle of a checkpoint, after the
/// guest ran on past its saved state (its RAM file and disk are newer than
/// the state; at the second point even the checkpoint's own RAM copy and
/// state are complete, but the disk is not its own). Recovery must not take
/// them for a suspend (silent guest corruption): the VM comes back from its
/// last complete snapshot.
#[tokio::test]
async fn a_checkpoint_cut_short_is_never_recovered_as_a_suspend() {
    let (_garage, mut d, id, boot) = setup().await;
    for (i, point) in ["checkpoint.resumed", "checkpoint.files_committed"]
        .into_iter()
        .enumerate()
    {
        let good = d.snapshot(&id, false).await;
        wait_ready(&d, &id, &good).await;
        let n = counter(&d).await; // the checkpoint's + 1
        let later = format!("later{i}");
        disk_write(&d, &later, "x").await;
        assert_eq!(counter(&d).await, n + 1);

        arm(&mut d, point).await;
        let qemu = d.qemu_pids();
        let half = d.snapshot(&id, false).await;
        d.wait_for_crash().await;
        for pid in qemu {
            hatch_e2e::kill_pid(pid);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !d.qemu_pids().is_empty() {
            assert!(Instant::now() < deadline, "QEMU survived SIGKILL");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        d.set_env("HATCH_FAULTS", None);
        d.start_again().await;
        let vm = d.vm(&id).await;
        assert_eq!(vm["state"], "snapshotted", "{point}: {vm}");
        let (_, snap) = d
            .call(Method::GET, &format!("/vms/{id}/snapshots/{half}"), None)
            .await;
        assert_eq!(snap["status"], "failed", "{point}: {snap}");
        d.restore(&id, json!({})).await;
        assert_eq!(boot_id(&d).await, boot);
        assert_eq!(
            counter(&d).await,
            n,
            "{point}: the complete checkpoint's state"
        );
        assert_eq!(disk_read(&d, &later).await, None, "{point}: its disk too");
        assert_eq!(disk_read(&d, "base").await.as_deref(), Some("kept"));
    }
}

async fn suspended(d: &Daemon, id: &str) {
    let sid = d.snapshot(id, true).await;
    wait_ready(d, id, &sid).await;
    d.wait_state(id, "snapshotted").await;
}

#[tokio::test]
async fn a_crash_at_any_step_of_a_wake_loses_nothing() {
    let (_garage, mut d, id, boot) = setup().await;
    let mut n = counter(&d).await;
    for (point, from_s3) in [
        ("restore.prepared", false),
        ("restore.ram_taken", false),
        ("restore.launched", false),
        ("restore.state_loaded", false),
        ("fetch.downloaded", true),
        ("restore.prepared", true),
        // From S3 the memory is served lazily rather than taken.
        ("restore.ram_served", true),
        ("restore.launched", true),
        ("restore.state_loaded", true),
    ] {
        suspended(&d, &id).await;
        if from_s3 {
            d.wipe_local_snapshots(&id);
        }
        arm(&mut d, point).await;
        // Woken by a request through the proxy; the answer never comes.
        let proxy = d.proxy_addr;
        let request = tokio::spawn(async move {
            let _ = reqwest::Client::new()
                .get(format!("http://{proxy}/counter"))
                .header("host", HOST)
                .send()
                .await;
        });
        let (state, t) = crash_and_recover(&mut d, &id, point).await;
        request.abort();
        if state == "snapshotted" {
            // A lazy RAM server of the wake cut short is gone with it.
            assert_eq!(d.lazyram_pids(), Vec::<i32>::new(), "{point}");
            assert_eq!(d.lazy_mounts(), Vec::<String>::new(), "{point}");
        }
        wake(&d, &id, &state).await;
        let src = if from_s3 { "S3" } else { "local copy" };
        report(&format!("{point} ({src})"), &state, t);
        assert_eq!(boot_id(&d).await, boot, "{point}");
        n += 1;
        assert_eq!(counter(&d).await, n, "{point} from {src}");
        assert_eq!(disk_read(&d, "base").await.as_deref(), Some("kept"));
    }
}

#[tokio::test]
async fn a_crash_at_any_step_of_a_rollback_leaves_one_of_the_two_states() {
    let (_garage, mut d, id, boot) = setup().await;
    for (i, point) in [
        "rollback.fetched",
        "rollback.halted",
        "restore.launched",
        "restore.state_loaded",
    ]
    .into_iter()
    .enumerate()
    {
        let sid = d.snapshot(&id, false).await;
        wait_ready(&d, &id, &sid).await;
        let at = counter(&d).await; // the checkpoint's counter + 1
        let marker = format!("after{i}");
        disk_write(&d, &marker, "live").await;
        arm(&mut d, point).await;
        d.start_restore(&id, json!({ "snapshot_id": sid })).await;
        let (state, t) = crash_and_recover(&mut d, &id, point).await;
        if state == "snapshotted" {
            d.restore(&id, json!({ "snapshot_id": sid })).await;
        }
        report(point, &state, t);
        assert_eq!(boot_id(&d).await, boot);
        // Exactly one of the two states: the live one (counter goes on,
        // the marker is there) or the checkpoint's (neither).
        let c = counter(&d).await;
        let m = disk_read(&d, &marker).await;
        assert!(
            (c == at + 1 && m.as_deref() == Some("live")) || (c == at && m.is_none()),
            "{point}: counter {c} (live {at}) and marker {m:?} are not one state"
        );
    }
}

/// A suspend step fails after QEMU has ended, and so does the attempt to
/// complete the suspend right away: the saved state and RAM image are the
/// VM's only state. They are kept (the VM shows failed, with the reason)
/// and the suspend is completed when the daemon next starts.
#[tokio::test]
async fn a_suspend_that_cannot_be_completed_keeps_its_state_for_the_next_start() {
    let (_garage, mut d, id, boot) = setup().await;
    let n = counter(&d).await;
    d.set_env(
        "HATCH_FAULTS",
        Some("suspend.qemu_ended=fail,suspend.complete=fail:1"),
    );
    d.restart().await;
    let sid = d.snapshot(&id, true).await;
    let vm = d.wait_state(&id, "failed").await;
    assert!(
        vm["state_reason"]
            .as_str()
            .unwrap()
            .contains("its saved state is kept"),
        "{vm}"
    );
    assert!(d.qemu_pids().is_empty());
    d.set_env("HATCH_FAULTS", None);
    d.restart().await;
    let vm = d.vm(&id).await;
    assert_eq!(vm["state"], "snapshotted", "{vm}");
    wait_ready(&d, &id, &sid).await;
    d.restore(&id, json!({})).await;
    assert_eq!(boot_id(&d).await, boot);
    assert_eq!(counter(&d).await, n + 1);
    assert_eq!(disk_read(&d, "base").await.as_deref(), Some("kept"));
}
