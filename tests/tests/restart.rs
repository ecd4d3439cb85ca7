//! A daemon restart re-attaches to VMs that kept running, and explains the
//! ones that died meanwhile.

#![allow(clippy::unwrap_used)]

use hatch_e2e::{Daemon, kill_pid, kv, process_alive};
use serde_json::json;

#[tokio::test]
async fn killed_daemon_reattaches_to_running_vms_and_marks_dead_ones() {
    let mut d = Daemon::start().await;
    let keep = d.create_vm(json!({ "name": "keep" })).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let lose = d.create_vm(json!({ "name": "lose" })).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    d.wait_state(&keep, "running").await;
    d.wait_state(&lose, "running").await;
    d.create_route("keep.localhost", &keep).await;
    let before = d.wait_http("keep.localhost", "/").await;
    let (_, c) = d.proxy_get("keep.localhost", "/counter").await;
    assert_eq!(c.trim(), "counter=1");

    let lose_pid: i32 = std::fs::read_to_string(d.run_dir.join(format!("{lose}.pid")))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    d.kill_daemon();
    // While the daemon is down one VM dies.
    kill_pid(lose_pid);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while process_alive(lose_pid) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "QEMU survived SIGKILL"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    d.restart().await;

    // The survivor is the same machine: same boot, counter continues.
    assert_eq!(d.vm(&keep).await["state"], "running");
    let after = d.wait_http("keep.localhost", "/").await;
    assert_eq!(kv(&after, "boot_id"), kv(&before, "boot_id"));
    let (_, c) = d.proxy_get("keep.localhost", "/counter").await;
    assert_eq!(c.trim(), "counter=2");

    let lost = d.vm(&lose).await;
    assert_eq!(lost["state"], "failed", "{lost}");
    assert!(
        lost["state_reason"]
            .as_str()
            .unwrap()
            .contains("no longer running"),
        "{lost}"
    );

    // The re-attached VM is fully controllable.
    let (s, _) = d
        .call(reqwest::Method::POST, &format!("/vms/{keep}/stop"), None)
        .await;
    assert_eq!(s, reqwest::StatusCode::ACCEPTED);
    d.wait_state(&keep, "stopped").await;
    // A failed VM can be started again.
    let (s, _) = d
        .call(reqwest::Method::POST, &format!("/vms/{lose}/start"), None)
        .await;
    assert_eq!(s, reqwest::StatusCode::ACCEPTED);
    d.wait_state(&lose, "running").await;
}

#[tokio::test]
async fn qemu_dying_under_a_running_daemon_marks_the_vm_failed() {
    let d = Daemon::start().await;
    let id = d.create_vm(json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    d.wait_state(&id, "running").await;
    let pid = d.qemu_pids()[0];
    kill_pid(pid);
    let vm = d.wait_state(&id, "failed").await;
    assert!(
        vm["state_reason"].as_str().unwrap().contains("QEMU exited"),
        "{vm}"
    );
}
