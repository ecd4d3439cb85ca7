//! Wakes from S3 with memory served lazily (`snapshot/lazy.rs`): the guest
//! runs before its memory is all here. A suspend right after such a wake,
//! with the background fetch unfinished, loses nothing; S3 lost meanwhile
//! fails the suspend and leaves the VM running, and once S3 is back nothing
//! is lost; a daemon restarted or killed meanwhile loses nothing either
//! (killed at each step of a lazy wake: `crash_recovery.rs`), and a corrupt
//! chunk the fill meets after such a restart is reported all the same.
//!
//! The background fetch is paced (`HATCH_LAZY_FILL_PACE_MS`) so that the
//! memory is still arriving when the test acts.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hatch_e2e::{Daemon, Garage, kv};
use reqwest::StatusCode;
use serde_json::{Value, json};

const HOST: &str = "lazy.localhost";

async fn app(d: &Daemon, path: &str) -> String {
    let (s, body) = d.proxy_get(HOST, path).await;
    assert_eq!(s, StatusCode::OK, "{path}: {body}\n{}", d.daemon_log());
    body
}

async fn counter(d: &Daemon) -> u64 {
    kv(&app(d, "/counter").await, "counter").parse().unwrap()
}

async fn setup(extra: &[(&str, &str)]) -> (Garage, Daemon, String, String) {
    let garage = Garage::start().await;
    let mut env = garage.env();
    env.push(("HATCH_LAZY_FILL_PACE_MS".into(), "300".into()));
    env.push(("HATCH_UPLOAD_RETRY_MAX_SECONDS".into(), "2".into()));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let d = Daemon::start_with_env(env).await;
    let id = d.create_vm(json!({ "name": "lazy" })).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    d.wait_state(&id, "running").await;
    d.create_route(HOST, &id).await;
    d.wait_http(HOST, "/").await;
    let boot = kv(&app(&d, "/").await, "boot_id");
    (garage, d, id, boot)
}

/// Suspend, wait until S3 holds the snapshot, and drop every local copy.
/// Returns the snapshot's id.
async fn suspend_to_s3_only(d: &Daemon, id: &str) -> String {
    let sid = d.snapshot(id, true).await;
    d.wait_snapshot(id, &sid, "ready").await;
    d.wait_state(id, "snapshotted").await;
    d.wipe_local_snapshots(id);
    sid
}

#[tokio::test]
async fn a_suspend_right_after_a_lazy_wake_waits_for_the_memory_and_loses_nothing() {
    let (_garage, d, id, boot) = setup(&[]).await;
    let n = counter(&d).await;
    app(&d, "/disk/write?name=k&value=v1").await;
    suspend_to_s3_only(&d, &id).await;

    // Woken by a request: the guest answers while its memory is served
    // by a lazy RAM server of its own, through a FUSE mount.
    assert_eq!(counter(&d).await, n + 1);
    assert_eq!(d.lazyram_pids().len(), 1, "{}", d.daemon_log());
    assert_eq!(d.lazy_mounts().len(), 1);
    assert_eq!(kv(&app(&d, "/").await, "boot_id"), boot);
    app(&d, "/disk/write?name=k2&value=v2").await;

    // Suspended at once, the memory still arriving: the suspend waits for
    // it (the guest running), then pauses as usual.
    let sid = d.snapshot(&id, true).await;
    d.wait_snapshot(&id, &sid, "ready").await;
    d.wait_state(&id, "snapshotted").await;
    assert!(
        d.daemon_log()
            .contains("waiting for the rest of the memory from S3 before pausing"),
        "the memory had all arrived before the suspend; the test proves nothing:\n{}",
        d.daemon_log()
    );
    assert_eq!(d.lazyram_pids(), Vec::<i32>::new());
    assert_eq!(d.lazy_mounts(), Vec::<String>::new());

    // From the local copy that suspend left: everything there.
    assert_eq!(counter(&d).await, n + 2);
    assert_eq!(kv(&app(&d, "/").await, "boot_id"), boot);
    assert_eq!(app(&d, "/disk/read?name=k2").await, "value=v2\n");

    // And from what it uploaded alone: the guest's writes made after the
    // lazy wake are in S3 too.
    suspend_to_s3_only(&d, &id).await;
    assert_eq!(counter(&d).await, n + 3);
    assert_eq!(kv(&app(&d, "/").await, "boot_id"), boot);
    assert_eq!(app(&d, "/disk/read?name=k").await, "value=v1\n");
    assert_eq!(app(&d, "/disk/read?name=k2").await, "value=v2\n");
}

#[tokio::test]
async fn s3_lost_during_a_lazy_wake_fails_the_suspend_and_the_vm_runs_on() {
    let (mut garage, mut d, id, boot) = setup(&[("HATCH_LAZY_FILL_TIMEOUT_SECONDS", "3")]).await;
    let n = counter(&d).await;
    suspend_to_s3_only(&d, &id).await;
    assert_eq!(counter(&d).await, n + 1);

    // S3 goes away while the memory is still arriving.
    garage.stop();
    let sid = d.snapshot(&id, true).await;
    let snap = d.wait_snapshot(&id, &sid, "failed").await;
    let error = snap["error"].as_str().unwrap_or_default().to_string();
    assert!(
        error.contains("not all fetched from S3"),
        "unexpected error: {error}"
    );
    let vm = d.wait_state(&id, "running").await;
    assert!(
        vm["state_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("the vm runs on"),
        "{vm}"
    );
    assert_eq!(d.lazyram_pids().len(), 1, "the server keeps serving");

    // S3 back: the fetch resumes, the guest never noticed. The daemon is
    // restarted with room to wait for the rest of the memory (the fill is
    // paced and backs off while S3 is away); the VM and its server run on.
    garage.restart().await;
    d.set_env("HATCH_LAZY_FILL_TIMEOUT_SECONDS", Some("300"));
    d.restart().await;
    assert_eq!(counter(&d).await, n + 2);
    suspend_to_s3_only(&d, &id).await;
    assert_eq!(counter(&d).await, n + 3);
    assert_eq!(kv(&app(&d, "/").await, "boot_id"), boot);
}

#[tokio::test]
async fn a_daemon_restarted_or_killed_while_the_memory_arrives_loses_nothing() {
    let (garage, mut d, id, boot) = setup(&[]).await;
    let n = counter(&d).await;
    suspend_to_s3_only(&d, &id).await;
    assert_eq!(counter(&d).await, n + 1);

    // A restart while the memory arrives: the guest and its RAM server run
    // on, and the new daemon takes both up again.
    d.set_env("HATCH_FAULTS", Some("suspend.qemu_ended"));
    d.restart().await;
    assert_eq!(counter(&d).await, n + 2);
    assert_eq!(d.lazyram_pids().len(), 1);

    // Killed in the suspend once QEMU has ended: the RAM server syncs the
    // guest's writes and ends by itself; the next daemon finishes the
    // suspend from its end status.
    let sid = d.snapshot(&id, true).await;
    d.wait_for_crash().await;
    d.set_env("HATCH_FAULTS", None);
    d.start_again().await;
    d.wait_snapshot(&id, &sid, "ready").await;
    d.wait_state(&id, "snapshotted").await;
    assert_eq!(d.lazyram_pids(), Vec::<i32>::new());
    assert_eq!(d.lazy_mounts(), Vec::<String>::new());
    // What the guest asked for after its lazy wake is the next lazy
    // wake's prefetch list, although another daemon finished the suspend.
    let prefetch = &garage.manifest(&id, &sid).await["prefetch"];
    assert!(
        prefetch.as_array().is_some_and(|p| !p.is_empty()),
        "no prefetch list: {prefetch}"
    );
    assert_eq!(counter(&d).await, n + 3);
    assert_eq!(kv(&app(&d, "/").await, "boot_id"), boot);
}

#[tokio::test]
async fn a_corrupt_chunk_the_fill_meets_after_a_daemon_restart_is_reported() {
    // Paced (one chunk per 300 ms, zero chunks included: the whole 256 MiB
    // in ~77 s) so that the fill has fetched only a few chunks when the
    // test has corrupted them all, and reaches the rest before the
    // deadline below.
    let (garage, mut d, id, _boot) = setup(&[]).await;
    let n = counter(&d).await;
    let sid = suspend_to_s3_only(&d, &id).await;
    assert_eq!(counter(&d).await, n + 1);
    assert_eq!(d.lazyram_pids().len(), 1);

    // The daemon dies while the memory arrives; meanwhile every memory
    // chunk of the snapshot goes bad in S3. The new daemon never saw the
    // wake: only what it finds at start tells it that the fill runs on.
    d.kill_daemon();
    let manifest = garage.manifest(&id, &sid).await;
    let chunks: Vec<&str> = manifest["memory"]["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(!chunks.is_empty());
    for c in &chunks {
        garage.corrupt_chunk(c).await;
    }
    d.start_again().await;

    // The fill's next fetch reads a corrupt chunk: the VM says so, naming
    // the snapshot, and runs on (the guest waits only if it needs that
    // chunk).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let vm = loop {
        let vm = d.vm(&id).await;
        let reason = vm["state_reason"].as_str().unwrap_or_default();
        if reason.starts_with("snapshot_corrupt") {
            break vm;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the corrupt memory was never reported: {vm}\n{}",
            d.daemon_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(vm["state"], "running", "{vm}");
    let reason = vm["state_reason"].as_str().unwrap();
    assert!(reason.contains(&sid), "the snapshot is named: {reason}");
    assert!(
        chunks.iter().any(|c| reason.contains(c)),
        "the bad chunk is named: {reason}"
    );
}
