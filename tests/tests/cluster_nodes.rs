//! Two daemons sharing one PostgreSQL form a cluster: each registers and
//! heartbeats, both see every VM with the node it belongs to, neither acts
//! on (or recovers) the other's VMs, and a node that stops heartbeating is
//! shown down.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hatch_e2e::{Daemon, Garage, KEY, PATIENCE, Postgres, hatch_bin, kill_pid, kv};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn node_daemon(pg: &Postgres, name: &str) -> Daemon {
    Daemon::start_with_env(vec![
        ("HATCH_DATABASE_URL".into(), pg.url()),
        ("HATCH_NODE_NAME".into(), name.into()),
        ("HATCH_NODE_DOWN_SECONDS".into(), "3".into()),
    ])
    .await
}

async fn nodes(d: &Daemon) -> Vec<Value> {
    let (s, v) = d.call(Method::GET, "/nodes", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["nodes"].as_array().unwrap().clone()
}

#[tokio::test]
async fn nodes_share_vms_and_each_acts_only_on_its_own() {
    let pg = Postgres::start();
    let mut n1 = node_daemon(&pg, "n1").await;
    let mut n2 = node_daemon(&pg, "node-two").await;
    let (id, boot) = n1.boot_routed("shared").await;
    assert_eq!(n1.vm(&id).await["node"], "n1");

    // n2 sees the VM (by id and by name) and where it runs.
    let (s, v) = n2.call(Method::GET, "/vms/shared", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["id"].as_str(), v["node"].as_str()),
        (Some(id.as_str()), Some("n1"))
    );
    assert_eq!(v["state"], "running");
    let (_, list) = n2.call(Method::GET, "/vms", None).await;
    assert_eq!(list["vms"].as_array().unwrap().len(), 1, "{list}");

    let all = nodes(&n2).await;
    let names: Vec<&str> = all.iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["n1", "node-two"]);
    assert!(all.iter().all(|n| n["state"] == "up"), "{all:?}");
    assert_eq!(all[0]["vms"], 1);
    assert_eq!(all[1]["vms"], 0);
    assert!(all[0]["address"].is_null(), "no --cluster-addr");
    assert!(all[0]["free_memory_mib"].as_u64().unwrap() > 0);

    // Without cluster addresses nothing can be forwarded: calls that act on
    // the VM are refused by the node that does not run it, naming the node
    // that does; nothing changes.
    for (method, path, body) in [
        (Method::POST, format!("/vms/{id}/stop"), None),
        (
            Method::POST,
            "/vms/shared/snapshot".to_string(),
            Some(json!({})),
        ),
        (Method::DELETE, format!("/vms/{id}"), None),
        (
            Method::POST,
            "/routes".to_string(),
            Some(json!({ "hostname": "other.localhost", "vm_id": "shared" })),
        ),
    ] {
        let (s, v) = n2.call(method.clone(), &path, body).await;
        assert_eq!(s, StatusCode::CONFLICT, "{method} {path}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("node 'n1'"), "{msg}");
    }

    // A restarted n2 leaves n1's VM alone (it is not n2's to recover).
    n2.restart().await;
    assert_eq!(n1.vm(&id).await["state"], "running");
    let root = n1.get_ok("shared.localhost", "/").await;
    assert_eq!(kv(&root, "boot_id"), boot);
    assert_eq!(
        n1.get_ok("shared.localhost", "/counter").await.trim(),
        "counter=1"
    );

    // The CLI lists the nodes through either.
    let out = std::process::Command::new(hatch_bin())
        .args(["node", "list", "--api", &n2.api_addr.to_string()])
        .env("HATCH_API_KEY", KEY)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("n1") && text.contains("node-two") && text.contains("up"),
        "{text}"
    );

    // n1 stops heartbeating (its daemon is gone): n2 shows it down.
    n1.kill_daemon();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let all = nodes(&n2).await;
        if all[0]["state"] == "down" {
            assert!(all[0]["seconds_since_heartbeat"].as_f64().unwrap() >= 3.0);
            assert_eq!(all[1]["state"], "up");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "n1 never down: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    n1.restart().await;
    assert_eq!(
        nodes(&n2).await[0]["state"],
        "up",
        "a returning node is up again"
    );
}

/// A node of a three-node cluster with cluster addresses and a shared secret.
async fn cluster_node(pg: &Postgres, garage: &Garage, name: &str) -> Daemon {
    Daemon::cluster_node(pg, garage, name, &[]).await
}

async fn cluster_addr_of(d: &Daemon, name: &str) -> String {
    let all = nodes(d).await;
    let node = all.iter().find(|n| n["name"] == name).unwrap();
    node["address"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn any_node_serves_requests_and_api_calls_for_a_vm_on_another() {
    let pg = Postgres::start();
    let garage = Garage::start().await;
    let n1 = cluster_node(&pg, &garage, "n1").await;
    let n2 = cluster_node(&pg, &garage, "n2").await;
    let n3 = cluster_node(&pg, &garage, "n3").await;

    // Created through n1, routed through n2 (carried out by n1), requested
    // through n3's proxy (forwarded to n1).
    let id = n1.create_vm(json!({ "name": "web" })).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    n1.wait_state(&id, "running").await;
    let (s, route) = n2
        .call(
            Method::POST,
            "/routes",
            Some(json!({ "hostname": "web.localhost", "vm_id": "web" })),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{route}");
    let boot = kv(&n3.wait_http("web.localhost", "/").await, "boot_id");
    assert_eq!(
        n3.get_ok("web.localhost", "/counter").await.trim(),
        "counter=1"
    );
    assert_eq!(
        n2.get_ok("web.localhost", "/counter").await.trim(),
        "counter=2"
    );
    assert_eq!(
        n1.get_ok("web.localhost", "/counter").await.trim(),
        "counter=3"
    );

    // A WebSocket through n3 reaches the VM on n1, both ways.
    {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://{}/ws", n3.proxy_addr)
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("host", "web.localhost".parse().unwrap());
        let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        for msg in [
            Message::text("across nodes"),
            Message::binary(vec![0u8, 255]),
        ] {
            ws.send(msg.clone()).await.unwrap();
            assert_eq!(ws.next().await.unwrap().unwrap(), msg);
        }
        ws.close(None).await.unwrap();
    }

    // API calls that act on the VM, through a node that does not run it.
    let (s, logs) = n2.call(Method::GET, "/vms/web/logs", None).await;
    assert_eq!(s, StatusCode::OK, "{logs}");
    let (s, snap) = n3
        .call(
            Method::POST,
            &format!("/vms/{id}/snapshot"),
            Some(json!({ "stop": true })),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{snap}");
    let sid = snap["id"].as_str().unwrap();
    n2.wait_snapshot(&id, sid, "ready").await;
    n3.wait_state(&id, "snapshotted").await;
    // A request through n2 wakes it on its node: the same machine.
    let root = n2.get_ok("web.localhost", "/").await;
    assert_eq!(kv(&root, "boot_id"), boot);
    assert_eq!(
        n3.get_ok("web.localhost", "/counter").await.trim(),
        "counter=4"
    );
    let vm = n2.vm(&id).await;
    assert_eq!(
        (vm["state"].as_str(), vm["node"].as_str()),
        (Some("running"), Some("n1"))
    );

    // The cluster address serves signed hops only.
    let n1_cluster = cluster_addr_of(&n2, "n1").await;
    let http = reqwest::Client::new();
    let unsigned = http
        .get(format!("http://{n1_cluster}/"))
        .header("host", "web.localhost")
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), StatusCode::FORBIDDEN);
    let forged = http
        .get(format!("http://{n1_cluster}/"))
        .header("host", "web.localhost")
        .header(
            "x-hatch-hop",
            format!("n2 {} {}", now_secs(), "ab".repeat(32)),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    let body: Value = forged.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden", "{body}");
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn wait_vm(d: &Daemon, id: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let vm = d.vm(id).await;
        if ok(&vm) {
            return vm;
        }
        assert!(tokio::time::Instant::now() < deadline, "never {what}: {vm}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_lost_nodes_vms_wake_on_other_nodes_from_s3_with_one_restore() {
    let pg = Postgres::start();
    let garage = Garage::start().await;
    let mut n1 = cluster_node(&pg, &garage, "n1").await;
    let n2 = cluster_node(&pg, &garage, "n2").await;
    let n3 = cluster_node(&pg, &garage, "n3").await;

    // `a` is suspended on n1; `b` runs on n1 with a checkpoint in S3 and
    // work done after it.
    let (a, boot_a) = n1.boot_routed("a").await;
    assert_eq!(
        n1.get_ok("a.localhost", "/counter").await.trim(),
        "counter=1"
    );
    let sa = n1.snapshot(&a, true).await;
    n1.wait_snapshot(&a, &sa, "ready").await;
    n1.wait_state(&a, "snapshotted").await;
    let (b, boot_b) = n1.boot_routed("b").await;
    assert_eq!(
        n1.get_ok("b.localhost", "/counter").await.trim(),
        "counter=1"
    );
    let sb = n1.snapshot(&b, false).await;
    n1.wait_snapshot(&b, &sb, "ready").await;
    assert_eq!(
        n1.get_ok("b.localhost", "/counter").await.trim(),
        "counter=2"
    );

    // n1 is lost: its daemon and its QEMU processes die.
    let qemus = n1.qemu_pids();
    n1.kill_daemon();
    for pid in qemus {
        kill_pid(pid);
    }

    // `b` is taken over from its checkpoint; the reason says what was lost.
    let vm = wait_vm(&n2, &b, "taken over", |v| v["state"] == "snapshotted").await;
    let reason = vm["state_reason"].as_str().unwrap();
    assert!(
        reason.contains("node 'n1' was lost") && reason.contains(&sb) && reason.contains("gone"),
        "{reason}"
    );
    assert_eq!(
        n2.vm(&a).await["state"],
        "snapshotted",
        "a suspended VM stays as it is"
    );

    // `b` resumes from its checkpoint on another node: the work after the
    // checkpoint is gone, the machine is the same.
    assert_eq!(
        n3.get_ok("b.localhost", "/counter").await.trim(),
        "counter=2"
    );
    assert_eq!(kv(&n2.get_ok("b.localhost", "/").await, "boot_id"), boot_b);
    let vm = n3.vm(&b).await;
    let b_node = vm["node"].as_str().unwrap().to_string();
    assert!(b_node == "n2" || b_node == "n3", "{vm}");

    // Requests through n2 and n3 at once for `a`: it is placed on the node
    // not running `b` (the least loaded), whichever node the requests
    // reach: one claim wins, every request is forwarded to the VM's new
    // node, and it is restored there from S3 once.
    let (r2, r3) = tokio::join!(
        n2.proxy_get("a.localhost", "/counter"),
        n3.proxy_get("a.localhost", "/counter")
    );
    assert_eq!(
        (r2.0, r3.0),
        (StatusCode::OK, StatusCode::OK),
        "{r2:?} {r3:?}"
    );
    let mut counters = [r2.1.trim().to_string(), r3.1.trim().to_string()];
    counters.sort();
    assert_eq!(
        counters,
        ["counter=2", "counter=3"],
        "the counter continues"
    );
    assert_eq!(kv(&n3.get_ok("a.localhost", "/").await, "boot_id"), boot_a);
    let vm = n2.vm(&a).await;
    let owner = vm["node"].as_str().unwrap().to_string();
    assert!(owner == "n2" || owner == "n3", "{vm}");
    assert_ne!(owner, b_node, "placed on the least loaded node: {vm}");
    assert_eq!(vm["state"], "running");
    let (_, events) = n2
        .call(Method::GET, &format!("/vms/{a}/events"), None)
        .await;
    let wakes = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "wake")
        .count();
    assert_eq!(wakes, 1, "exactly one restore: {events}");

    // A takeover is an event too.
    let (_, events) = n3
        .call(Method::GET, &format!("/vms/{b}/events"), None)
        .await;
    assert!(
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "takeover"),
        "{events}"
    );
}

fn signal(pids: &[i32], sig: i32) {
    for &pid in pids {
        // SAFETY: kill(2) with a pid this test started (directly or through
        // the daemon); it has no memory-safety preconditions.
        unsafe { libc::kill(pid, sig) };
    }
}

#[tokio::test]
async fn a_node_frozen_past_its_lease_lets_go_of_what_was_taken_over() {
    let pg = Postgres::start();
    let garage = Garage::start().await;
    let n1 = cluster_node(&pg, &garage, "n1").await;
    let n2 = cluster_node(&pg, &garage, "n2").await;
    let (c, boot) = n1.boot_routed("c").await;
    assert_eq!(
        n2.get_ok("c.localhost", "/counter").await.trim(),
        "counter=1"
    );
    let sc = n1.snapshot(&c, false).await;
    n1.wait_snapshot(&c, &sc, "ready").await;
    assert_eq!(
        n1.get_ok("c.localhost", "/counter").await.trim(),
        "counter=2"
    );

    // The whole host freezes (daemon and QEMU): n2 takes the VM over from
    // its checkpoint and wakes it.
    let mut frozen = n1.qemu_pids();
    let qemu = frozen[0];
    frozen.push(n1.daemon_pid().unwrap());
    signal(&frozen, libc::SIGSTOP);
    wait_vm(&n2, &c, "taken over", |v| v["state"] == "snapshotted").await;
    assert_eq!(
        n2.get_ok("c.localhost", "/counter").await.trim(),
        "counter=2"
    );
    let vm = n2.vm(&c).await;
    assert_eq!(
        (vm["node"].as_str(), vm["state"].as_str()),
        (Some("n2"), Some("running"))
    );

    // n1 thaws: it fences itself, sees the VM is n2's, and ends its own
    // QEMU without writing anything about the VM.
    signal(&frozen, libc::SIGCONT);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while hatch_e2e::process_alive(qemu) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "n1 kept running the vm"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let vm = n2.vm(&c).await;
    assert_eq!(
        (vm["node"].as_str(), vm["state"].as_str()),
        (Some("n2"), Some("running")),
        "{vm}"
    );
    // Through n1's proxy the request goes to the VM where it runs now.
    assert_eq!(
        n1.get_ok("c.localhost", "/counter").await.trim(),
        "counter=3"
    );
    assert_eq!(kv(&n1.get_ok("c.localhost", "/").await, "boot_id"), boot);
    let all = nodes(&n2).await;
    assert!(all.iter().all(|n| n["state"] == "up"), "{all:?}");
}

#[tokio::test]
async fn a_vm_moves_to_another_node_and_continues_there() {
    let pg = Postgres::start();
    let garage = Garage::start().await;
    let n1 = cluster_node(&pg, &garage, "n1").await;
    let n2 = cluster_node(&pg, &garage, "n2").await;
    let (id, boot) = n1.boot_routed("mover").await;
    assert_eq!(
        n1.get_ok("mover.localhost", "/counter").await.trim(),
        "counter=1"
    );

    // Asked through n2 (carried out by n1, which runs it).
    let (s, vm) = n2
        .call(
            Method::POST,
            &format!("/vms/{id}/move"),
            Some(json!({ "to": "n2" })),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{vm}");
    assert_eq!(vm["node"], "n2", "{vm}");
    let vm = n2.wait_state(&id, "running").await;
    assert_eq!(vm["node"], "n2");
    assert!(n1.qemu_pids().is_empty(), "nothing of it runs on n1");
    // The same machine, its counter continuing, reached through either node.
    assert_eq!(
        n1.get_ok("mover.localhost", "/counter").await.trim(),
        "counter=2"
    );
    assert_eq!(
        kv(&n2.get_ok("mover.localhost", "/").await, "boot_id"),
        boot
    );

    // Bad moves change nothing.
    for (body, status) in [
        (json!({ "to": "nowhere" }), StatusCode::NOT_FOUND),
        (json!({ "to": "n2" }), StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let (s, v) = n1
            .call(Method::POST, &format!("/vms/{id}/move"), Some(body))
            .await;
        assert_eq!(s, status, "{v}");
    }
    assert_eq!(n1.vm(&id).await["state"], "running");

    // Moved back without waking: it waits, suspended, for its next request.
    let (s, vm) = n1
        .call(
            Method::POST,
            &format!("/vms/{id}/move"),
            Some(json!({ "to": "n1", "start": false })),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{vm}");
    assert_eq!(
        (vm["node"].as_str(), vm["state"].as_str()),
        (Some("n1"), Some("snapshotted"))
    );
    assert_eq!(
        n2.get_ok("mover.localhost", "/counter").await.trim(),
        "counter=3"
    );
    assert_eq!(n1.vm(&id).await["node"], "n1");

    // Draining n1 (through the CLI on n2) moves both of its VMs to n2.
    let (other, other_boot) = n1.boot_routed("other").await;
    let out = std::process::Command::new(hatch_bin())
        .args(["node", "drain", "n1", "--api", &n2.api_addr.to_string()])
        .env("HATCH_API_KEY", KEY)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("moved {id} to n2")), "{text}");
    assert!(text.contains(&format!("moved {other} to n2")), "{text}");
    let all = nodes(&n1).await;
    assert_eq!(
        (all[0]["name"].as_str(), all[0]["state"].as_str()),
        (Some("n1"), Some("draining"))
    );
    let vm = n2.wait_state(&other, "running").await;
    assert_eq!(vm["node"], "n2");
    assert_eq!(
        kv(&n1.get_ok("other.localhost", "/").await, "boot_id"),
        other_boot
    );
    assert_eq!(
        n1.get_ok("mover.localhost", "/counter").await.trim(),
        "counter=4"
    );
    assert_eq!(n2.vm(&id).await["node"], "n2");
    assert!(n1.qemu_pids().is_empty());
    let (s, _) = n2.call(Method::POST, "/nodes/n1/undrain", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(nodes(&n2).await[0]["state"], "up");
    let (s, _) = n2.call(Method::POST, "/nodes/nope/drain", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_node_with_another_cpu_model_refuses_the_restore_clearly() {
    let pg = Postgres::start();
    let garage = Garage::start().await;
    let n1 = cluster_node(&pg, &garage, "n1").await;
    let mut n2 = cluster_node(&pg, &garage, "n2").await;
    n2.set_env("HATCH_CPU_MODEL", Some("qemu64"));
    n2.restart().await;
    let (id, _) = n1.boot_routed("cpu").await;
    let (s, vm) = n1
        .call(
            Method::POST,
            &format!("/vms/{id}/move"),
            Some(json!({ "to": "n2", "start": false })),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{vm}");
    let (s, body) = n2.proxy_get("cpu.localhost", "/").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body.contains("CPU model") && body.contains("--cpu-model"),
        "{body}"
    );
    // Nothing is lost: the VM stays suspended, restorable where the model fits.
    let vm = n2.vm(&id).await;
    assert_eq!(vm["state"], "snapshotted", "{vm}");
    let (s, vm) = n2
        .call(
            Method::POST,
            &format!("/vms/{id}/move"),
            Some(json!({ "to": "n1" })),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{vm}");
    n1.wait_state(&id, "running").await;
    n1.get_ok("cpu.localhost", "/").await;
}
