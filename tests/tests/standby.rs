//! Standby QEMUs (`supervisor/standby.rs`). Warm (the default): a suspend
//! keeps the VM's QEMU, paused after saving its state, and a wake lets it
//! run. Cold (`HATCH_STANDBY_WARM=false`, and after a daemon restart): once
//! a suspended VM's snapshot is in S3, a QEMU with its next wake's command
//! line waits for the state. Either way a wake loses nothing; a standby that
//! died or no longer fits is ended and the wake starts its own QEMU; a stop,
//! a delete, the pool's bound and a daemon killed meanwhile leave none
//! behind (a restarted daemon starts its own for the newest suspended VMs).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hatch_e2e::{Daemon, Garage, assert_guest_clock, kill_pid, kv, process_alive};
use reqwest::{Method, StatusCode};
use serde_json::json;

async fn app(d: &Daemon, host: &str, path: &str) -> String {
    let (s, body) = d.proxy_get(host, path).await;
    assert_eq!(s, StatusCode::OK, "{path}: {body}\n{}", d.daemon_log());
    body
}

async fn counter(d: &Daemon, host: &str) -> u64 {
    kv(&app(d, host, "/counter").await, "counter")
        .parse()
        .unwrap()
}

/// A daemon whose standbys are started after the upload (cold).
async fn daemon(standbys: &str) -> (Garage, Daemon) {
    let garage = Garage::start().await;
    let mut env = garage.env();
    env.push(("HATCH_STANDBY_QEMUS".into(), standbys.into()));
    env.push(("HATCH_STANDBY_WARM".into(), "false".into()));
    let d = Daemon::start_with_env(env).await;
    (garage, d)
}

/// A daemon whose suspends keep their QEMU warm (the default).
async fn warm_daemon() -> (Garage, Daemon) {
    let garage = Garage::start().await;
    let mut env = garage.env();
    env.push(("HATCH_STANDBY_QEMUS".into(), "2".into()));
    let d = Daemon::start_with_env(env).await;
    (garage, d)
}

/// The VM's one QEMU.
fn only_qemu(d: &Daemon) -> i32 {
    let pids = d.qemu_pids();
    assert_eq!(pids.len(), 1, "one QEMU: {pids:?}\n{}", d.daemon_log());
    pids[0]
}

/// Suspend the VM and wait until S3 holds the snapshot; its QEMU `pid`
/// stays, as the only standby. Returns the snapshot's id.
async fn suspend_warm(d: &Daemon, id: &str, pid: i32) -> String {
    let sid = d.snapshot(id, true).await;
    d.wait_snapshot(id, &sid, "ready").await;
    d.wait_state(id, "snapshotted").await;
    await_standbys(d, 1).await;
    assert_eq!(
        d.qemu_pids(),
        [pid],
        "the VM's QEMU is kept:\n{}",
        d.daemon_log()
    );
    sid
}

async fn routed_vm(d: &Daemon, name: &str) -> (String, String) {
    let host = format!("{name}.localhost");
    let id = d.create_vm(json!({ "name": name })).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    d.wait_state(&id, "running").await;
    d.create_route(&host, &id).await;
    d.wait_http(&host, "/").await;
    (id, host)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn standby_wakes(d: &Daemon) -> f64 {
    metric(&d.metrics_text().await, "hatch_standby_wakes_total")
}

/// Suspend the VM and wait until S3 holds the snapshot and its standby
/// QEMU runs (the only standby); returns that QEMU's pid.
async fn suspend_until_standby(d: &Daemon, id: &str) -> i32 {
    let before = d.qemu_pids();
    let sid = d.snapshot(id, true).await;
    d.wait_snapshot(id, &sid, "ready").await;
    d.wait_state(id, "snapshotted").await;
    await_standbys(d, 1).await;
    let new: Vec<i32> = d
        .qemu_pids()
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert_eq!(new.len(), 1, "one standby QEMU:\n{}", d.daemon_log());
    new[0]
}

/// A route to guest port 8081 (the VM forwards only 8080 until then).
async fn route_to_port_8081(d: &Daemon, id: &str) {
    let (s, body) = d
        .call(
            Method::POST,
            "/routes",
            Some(json!({ "hostname": "other.localhost", "vm_id": id, "port": 8081 })),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
}

async fn await_standbys(d: &Daemon, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while metric(&d.metrics_text().await, "hatch_standby_qemus") != n as f64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {n} standby QEMUs:\n{}",
            d.daemon_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn await_gone(d: &Daemon, pid: i32, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while process_alive(pid) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: the standby QEMU {pid} still runs:\n{}",
            d.daemon_log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_wake_loads_into_the_standby_and_loses_nothing() {
    let (_garage, d) = daemon("2").await;
    let (id, host) = routed_vm(&d, "warm").await;
    let boot = kv(&app(&d, &host, "/").await, "boot_id");
    app(&d, &host, "/disk/write?name=k&value=v1").await;
    let n = counter(&d, &host).await;

    let standby = suspend_until_standby(&d, &id).await;
    // Woken by a request: the standby QEMU is the VM's QEMU now.
    assert_eq!(counter(&d, &host).await, n + 1);
    assert_eq!(d.qemu_pids(), [standby], "{}", d.daemon_log());
    assert_eq!(standby_wakes(&d).await, 1.0);
    let root = app(&d, &host, "/").await;
    assert_eq!(kv(&root, "boot_id"), boot);
    assert_guest_clock(&root, 1.0);
    assert_eq!(
        app(&d, &host, "/disk/read?name=k").await,
        "value=v1\n",
        "the disk is intact"
    );
    // Its writes land on the new layer and survive the next cycle, into
    // the next standby.
    app(&d, &host, "/disk/write?name=k&value=v2").await;
    let next = suspend_until_standby(&d, &id).await;
    assert_ne!(next, standby);
    assert_eq!(counter(&d, &host).await, n + 2);
    assert_eq!(app(&d, &host, "/disk/read?name=k").await, "value=v2\n");
    assert_eq!(standby_wakes(&d).await, 2.0);
}

#[tokio::test]
async fn a_wake_during_the_standbys_start_does_not_take_it() {
    let garage = Garage::start().await;
    let mut env = garage.env();
    env.push(("HATCH_STANDBY_QEMUS".into(), "2".into()));
    env.push(("HATCH_STANDBY_WARM".into(), "false".into()));
    // The standby's start waits after it has noted the RAM image, so that
    // the wake below moves the image before QEMU opens it.
    env.push(("HATCH_FAULTS".into(), "standby.launch=delay:3000".into()));
    let d = Daemon::start_with_env(env).await;
    let (id, host) = routed_vm(&d, "race").await;
    let boot = kv(&app(&d, &host, "/").await, "boot_id");
    app(&d, &host, "/disk/write?name=k&value=v1").await;
    let n = counter(&d, &host).await;
    let sid = d.snapshot(&id, true).await;
    d.wait_snapshot(&id, &sid, "ready").await;
    d.wait_state(&id, "snapshotted").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !d.daemon_log().contains("injected fault: delaying") {
        assert!(tokio::time::Instant::now() < deadline, "{}", d.daemon_log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The wake takes the image and waits for the standby's start; that
    // QEMU mapped no image (QEMU made an empty file under the old name)
    // and is ended; the wake starts its own and nothing is lost.
    assert_eq!(counter(&d, &host).await, n + 1, "{}", d.daemon_log());
    assert_eq!(kv(&app(&d, &host, "/").await, "boot_id"), boot);
    assert_eq!(app(&d, &host, "/disk/read?name=k").await, "value=v1\n");
    assert_eq!(standby_wakes(&d).await, 0.0);
    assert_eq!(d.qemu_pids().len(), 1, "the late standby was ended");
    await_standbys(&d, 0).await;
}

#[tokio::test]
async fn a_dead_or_unfitting_standby_is_ended_and_the_wake_starts_its_own() {
    let (_garage, d) = daemon("2").await;
    let (id, host) = routed_vm(&d, "cold").await;
    let n = counter(&d, &host).await;

    // The standby died (killed from outside): the wake notices, starts a
    // QEMU of its own, and nothing is lost.
    let standby = suspend_until_standby(&d, &id).await;
    kill_pid(standby);
    assert_eq!(counter(&d, &host).await, n + 1, "{}", d.daemon_log());
    let pids = d.qemu_pids();
    assert_eq!(pids.len(), 1);
    assert_ne!(pids[0], standby);
    assert_eq!(standby_wakes(&d).await, 0.0);

    // A route to another guest port added while suspended: the wake's
    // command line forwards one more port, so the standby does not fit.
    let standby = suspend_until_standby(&d, &id).await;
    route_to_port_8081(&d, &id).await;
    assert_eq!(counter(&d, &host).await, n + 2, "{}", d.daemon_log());
    await_gone(&d, standby, "a wake it does not fit").await;
    assert_eq!(d.qemu_pids().len(), 1);
    assert_eq!(standby_wakes(&d).await, 0.0);
    let ports = d.vm(&id).await["ports"].clone();
    assert!(
        ports.as_array().unwrap().iter().any(|p| p["guest"] == 8081),
        "the new port is forwarded: {ports}"
    );
}

#[tokio::test]
async fn a_restart_the_bound_a_stop_and_a_delete_end_standbys() {
    let (_garage, mut d) = daemon("1").await;
    let (a, host_a) = routed_vm(&d, "a").await;
    let n = counter(&d, &host_a).await;

    // A daemon killed while a standby waits: the next one ends it (it did
    // not start it) and starts one of its own, which the wake takes.
    let standby = suspend_until_standby(&d, &a).await;
    d.restart().await;
    await_gone(&d, standby, "the daemon restarted").await;
    await_standbys(&d, 1).await;
    let again = d.qemu_pids();
    assert_eq!(again.len(), 1, "{}", d.daemon_log());
    assert_eq!(counter(&d, &host_a).await, n + 1);
    assert_eq!(d.qemu_pids(), again, "the wake took the new standby");
    assert_eq!(standby_wakes(&d).await, 1.0);

    // The pool holds one: B's standby ends A's.
    let (b, host_b) = routed_vm(&d, "b").await;
    let standby_a = suspend_until_standby(&d, &a).await;
    let sid = d.snapshot(&b, true).await;
    d.wait_snapshot(&b, &sid, "ready").await;
    d.wait_state(&b, "snapshotted").await;
    await_gone(&d, standby_a, "the pool's bound").await;
    await_standbys(&d, 1).await;
    let standby_b = d.qemu_pids();
    assert_eq!(standby_b.len(), 1);

    // A stopped suspended VM has none; a deleted one neither.
    let (s, body) = d.call(Method::POST, &format!("/vms/{b}/stop"), None).await;
    assert!(s.is_success(), "{s}: {body}");
    await_gone(&d, standby_b[0], "a stop").await;
    assert_eq!(counter(&d, &host_a).await, n + 2, "A wakes without one");
    let standby_a = suspend_until_standby(&d, &a).await;
    let (s, body) = d.call(Method::DELETE, &format!("/vms/{a}"), None).await;
    assert!(s.is_success(), "{s}: {body}");
    await_gone(&d, standby_a, "a delete").await;
    assert!(d.qemu_pids().is_empty());
    // B, stopped, boots when asked (no standby in the way).
    assert_eq!(kv(&app(&d, &host_b, "/").await, "boot_id").len(), 36);
}

#[tokio::test]
async fn a_suspend_keeps_its_qemu_warm_and_a_wake_loses_nothing() {
    let (_garage, d) = warm_daemon().await;
    let (id, host) = routed_vm(&d, "warm").await;
    let boot = kv(&app(&d, &host, "/").await, "boot_id");
    app(&d, &host, "/disk/write?name=k&value=v1").await;
    let n = counter(&d, &host).await;
    let pid = only_qemu(&d);

    let first = suspend_warm(&d, &id, pid).await;
    // Woken by a request: the same QEMU runs on.
    assert_eq!(counter(&d, &host).await, n + 1);
    assert_eq!(d.qemu_pids(), [pid], "{}", d.daemon_log());
    assert_eq!(standby_wakes(&d).await, 1.0);
    let root = app(&d, &host, "/").await;
    assert_eq!(kv(&root, "boot_id"), boot);
    assert_guest_clock(&root, 1.0);
    assert_eq!(app(&d, &host, "/disk/read?name=k").await, "value=v1\n");

    // Its writes go to the layer it switched to, and the next cycle keeps
    // the same QEMU again.
    app(&d, &host, "/disk/write?name=k&value=v2").await;
    suspend_warm(&d, &id, pid).await;
    assert_eq!(counter(&d, &host).await, n + 2);
    assert_eq!(app(&d, &host, "/disk/read?name=k").await, "value=v2\n");
    assert_eq!(standby_wakes(&d).await, 2.0);

    // The first snapshot is as it was captured: the warm runs wrote none
    // of its disk layers. Rolled back to it (its RAM image, taken by the
    // first wake, comes back from S3), the VM has its counter and disk.
    d.restore(&id, json!({ "snapshot_id": first })).await;
    assert_eq!(counter(&d, &host).await, n + 1, "{}", d.daemon_log());
    assert_eq!(app(&d, &host, "/disk/read?name=k").await, "value=v1\n");
    assert_eq!(kv(&app(&d, &host, "/").await, "boot_id"), boot);
    assert_ne!(only_qemu(&d), pid, "a rollback starts a QEMU of its own");
}

#[tokio::test]
async fn a_warm_standby_that_died_no_longer_fits_or_outlived_its_daemon_is_ended() {
    let (_garage, mut d) = warm_daemon().await;
    let (id, host) = routed_vm(&d, "kept").await;
    app(&d, &host, "/disk/write?name=k&value=v1").await;
    let n = counter(&d, &host).await;

    // Killed from outside while suspended: the state is in the local copy
    // (that QEMU never ran the guest again); the wake starts a QEMU.
    let pid = only_qemu(&d);
    suspend_warm(&d, &id, pid).await;
    kill_pid(pid);
    assert_eq!(counter(&d, &host).await, n + 1, "{}", d.daemon_log());
    assert_ne!(only_qemu(&d), pid);
    assert_eq!(standby_wakes(&d).await, 0.0);

    // A route to another guest port added while suspended: that QEMU
    // does not forward it, so it does not fit and is ended.
    let pid = only_qemu(&d);
    suspend_warm(&d, &id, pid).await;
    route_to_port_8081(&d, &id).await;
    assert_eq!(counter(&d, &host).await, n + 2, "{}", d.daemon_log());
    await_gone(&d, pid, "a wake it does not fit").await;
    assert_eq!(standby_wakes(&d).await, 0.0);

    // The daemon killed while one is kept: the next daemon ends it (it
    // could not know what it holds), and the wake loses nothing.
    let pid = only_qemu(&d);
    suspend_warm(&d, &id, pid).await;
    d.restart().await;
    await_gone(&d, pid, "the daemon restarted").await;
    assert_eq!(counter(&d, &host).await, n + 3, "{}", d.daemon_log());
    assert_eq!(app(&d, &host, "/disk/read?name=k").await, "value=v1\n");
}

#[tokio::test]
async fn a_warm_suspend_that_fails_loses_nothing() {
    let garage = Garage::start().await;
    let mut env = garage.env();
    env.push(("HATCH_STANDBY_QEMUS".into(), "2".into()));
    // The first suspend fails right after its disk switch, the second
    // after its QEMU was taken from the VM to be kept.
    env.push((
        "HATCH_FAULTS".into(),
        "suspend.disk_switched=fail:1,suspend.ram_kept=fail:1".into(),
    ));
    let d = Daemon::start_with_env(env).await;
    let (id, host) = routed_vm(&d, "faulty").await;
    app(&d, &host, "/disk/write?name=a&value=1").await;
    let n = counter(&d, &host).await;
    let pid = only_qemu(&d);

    // Failed in the pause after the switch: the guest runs on, on the new
    // layer, which the VM's disk chain now has.
    let sid = d.snapshot(&id, true).await;
    d.wait_snapshot(&id, &sid, "failed").await;
    d.wait_state(&id, "running").await;
    assert_eq!(counter(&d, &host).await, n + 1);
    assert_eq!(only_qemu(&d), pid);
    app(&d, &host, "/disk/write?name=b&value=2").await;

    // Failed after the state was saved: the kept QEMU is ended and the
    // suspend completed as one whose QEMU had ended.
    let sid = d.snapshot(&id, true).await;
    d.wait_state(&id, "snapshotted").await;
    d.wait_snapshot(&id, &sid, "ready").await;
    await_gone(&d, pid, "a suspend that failed after keeping it").await;
    assert_eq!(counter(&d, &host).await, n + 2, "{}", d.daemon_log());
    assert_eq!(app(&d, &host, "/disk/read?name=a").await, "value=1\n");
    assert_eq!(app(&d, &host, "/disk/read?name=b").await, "value=2\n");

    // And the next suspend keeps its QEMU again.
    let pid = only_qemu(&d);
    suspend_warm(&d, &id, pid).await;
    assert_eq!(counter(&d, &host).await, n + 3);
    assert_eq!(d.qemu_pids(), [pid]);
}

#[tokio::test]
async fn a_warm_suspend_ends_an_exec_and_its_image_loads_into_a_new_qemu() {
    let (_garage, d) = warm_daemon().await;
    let (id, host) = routed_vm(&d, "busy").await;
    let n = counter(&d, &host).await;
    // A command that runs across the suspend, on the agent channel.
    let exec = {
        let url = d.api_url(&format!("/vms/{id}/exec"));
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth(hatch_e2e::KEY)
                .json(&json!({"cmd": ["sh", "-c", "echo started > /tmp/busy; sleep 30"]}))
                .send()
                .await
                .map(|r| r.status())
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (s, body) = d
            .call(
                Method::POST,
                &format!("/vms/{id}/exec"),
                Some(json!({"cmd": ["cat", "/tmp/busy"]})),
            )
            .await;
        if s == StatusCode::OK && body["stdout"] == "started\n" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = only_qemu(&d);
    suspend_warm(&d, &id, pid).await;
    // The suspend closed the channel under the command: it ended, and no
    // exec reconnects to a suspended VM.
    let ended = exec.await.unwrap().unwrap();
    assert_ne!(ended, StatusCode::OK);
    // The image the suspend kept matches its saved state: with the kept
    // QEMU gone, a new one loads it and the guest goes on.
    kill_pid(pid);
    assert_eq!(counter(&d, &host).await, n + 1, "{}", d.daemon_log());
    assert_ne!(only_qemu(&d), pid);
}
