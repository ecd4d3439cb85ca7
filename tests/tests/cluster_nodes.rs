//! Two daemons sharing one PostgreSQL form a cluster: each registers and
//! heartbeats, both see every VM with the node it belongs to, neither acts
//! on (or recovers) the other's VMs, and a node that stops heartbeating is
//! shown down.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hatch_e2e::{Daemon, KEY, PATIENCE, Postgres, hatch_bin, kv};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn node_daemon(pg: &Postgres, name: &str) -> Daemon {
    Daemon::start_with_env(vec![
        ("HATCH_DATABASE_URL".into(), pg.url()),
        ("HATCH_NODE_NAME".into(), name.into()),
        (
            "HATCH_CLUSTER_ADDR".into(),
            format!("127.0.0.1:{}", 7100 + name.len()),
        ),
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
    assert_eq!(all[0]["address"], "127.0.0.1:7102");
    assert!(all[0]["free_memory_mib"].as_u64().unwrap() > 0);

    // Calls that act on the VM are refused by the node that does not run it,
    // naming the node that does; nothing changes.
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
            assert!(all[0]["seconds_since_heartbeat"].as_f64().unwrap() > 3.0);
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
