//! Real VMs through the real daemon and proxy: boot, serve, stop, start, delete.

#![allow(clippy::unwrap_used)]

use hatch_e2e::{Daemon, kv, process_alive};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

#[tokio::test]
async fn vm_boots_serves_through_the_proxy_keeps_its_disk_and_is_deleted() {
    let d = Daemon::start().await;
    let vm = d.create_vm(json!({ "name": "web" })).await;
    let id = vm["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("vm-"));
    assert_eq!(vm["state"], "starting");
    assert_eq!(vm["name"], "web");
    assert_eq!(vm["image"], "default");
    assert_eq!(vm["vcpus"], 1);
    assert_eq!(vm["memory_mib"], 256);
    d.wait_state(&id, "running").await;
    let route = d.create_route("Web.LocalHost", &id).await;
    assert_eq!(route["hostname"], "web.localhost");
    assert_eq!(route["port"], 8080);
    assert_eq!(route["auto_wake"], true);

    // The demo app, through the proxy (Host port ignored).
    let root = d.wait_http("web.localhost:1234", "/").await;
    let boot_id = kv(&root, "boot_id");
    assert_eq!(boot_id.len(), 36, "{root}");
    // The boot clock comes from the RTC (whole seconds): roughly right.
    hatch_e2e::assert_guest_clock(&root, 120.0);
    for n in 1..=3 {
        let (s, body) = d.proxy_get("web.localhost", "/counter").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body.trim(), format!("counter={n}"));
    }
    let (s, body) = d
        .proxy_get(
            "web.localhost",
            "/disk/write?name=greeting&value=hello%20disk",
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, body) = d
        .proxy_get("web.localhost", "/disk/read?name=greeting")
        .await;
    assert_eq!((s, body.trim()), (StatusCode::OK, "value=hello disk"));
    let (s, _) = d
        .proxy_get("web.localhost", "/disk/read?name=missing")
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Boot time was measured (the daemon's probe records it on its own
    // schedule, so wait for it); console was captured.
    let deadline = tokio::time::Instant::now() + hatch_e2e::PATIENCE;
    let boot_ms = loop {
        if let Some(ms) = d.vm(&id).await["boot_ms"].as_u64() {
            break ms;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "boot_ms never recorded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(boot_ms > 0);
    let (s, _) = d.call(Method::GET, &format!("/vms/{id}/logs"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(!d.console(&id).is_empty());

    // Illegal moves are 409 and change nothing.
    let (s, b) = d
        .call(Method::POST, &format!("/vms/{id}/start"), None)
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("conflict"))
    );
    let (s, b) = d
        .call(Method::POST, "/vms", Some(json!({ "name": "web" })))
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("conflict"))
    );
    let (s, b) = d
        .call(
            Method::POST,
            "/routes",
            Some(json!({ "hostname": "web.localhost", "vm_id": id })),
        )
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("conflict"))
    );
    // No S3 configured: snapshots are unavailable.
    let (s, b) = d
        .call(
            Method::POST,
            &format!("/vms/{id}/snapshot"),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("snapshot_storage_unavailable")
        )
    );
    assert_eq!(d.vm(&id).await["state"], "running");

    // Stop: QEMU exits; a route that does not auto-wake answers 503
    // vm_not_running (an auto-wake route would start it again).
    let (s, _) = d
        .call(
            Method::POST,
            "/routes",
            Some(json!({ "hostname": "manual.localhost", "vm_id": id, "auto_wake": false })),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let pids = d.qemu_pids();
    assert_eq!(pids.len(), 1);
    let (s, vm) = d.call(Method::POST, &format!("/vms/{id}/stop"), None).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{vm}");
    d.wait_state(&id, "stopped").await;
    assert!(!process_alive(pids[0]), "QEMU still runs after stop");
    let (s, body) = d.proxy_get("manual.localhost", "/").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "vm_not_running");
    let (s, _) = d.call(Method::POST, &format!("/vms/{id}/stop"), None).await;
    assert_eq!(s, StatusCode::CONFLICT);

    // Start again: a new boot, the disk kept, memory fresh.
    let (s, _) = d
        .call(Method::POST, &format!("/vms/{id}/start"), None)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    d.wait_state(&id, "running").await;
    let root = d.wait_http("web.localhost", "/").await;
    assert_ne!(kv(&root, "boot_id"), boot_id, "a start is a new boot");
    let (_, body) = d
        .proxy_get("web.localhost", "/disk/read?name=greeting")
        .await;
    assert_eq!(body.trim(), "value=hello disk");
    let (_, body) = d.proxy_get("web.localhost", "/counter").await;
    assert_eq!(body.trim(), "counter=1");

    // Delete: VM, QEMU, routes and files are gone.
    let pids = d.qemu_pids();
    let (s, _) = d.call(Method::DELETE, &format!("/vms/{id}"), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(pids.iter().all(|p| !process_alive(*p)));
    let (s, _) = d.call(Method::GET, &format!("/vms/{id}"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(
        d.call(Method::GET, "/routes", None).await.1,
        json!({ "routes": [] })
    );
    let (s, _) = d.proxy_get("web.localhost", "/").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(!d.data_dir.path().join("vms").join(&id).exists());
}

#[tokio::test]
async fn routes_to_other_guest_ports_are_forwarded_at_runtime() {
    let d = Daemon::start().await;
    let vm = d.create_vm(json!({ "vcpus": 1, "memory_mib": 128 })).await;
    let id = vm["id"].as_str().unwrap();
    assert_eq!(vm["name"], id, "name defaults to the id");
    d.wait_state(id, "running").await;
    // The guest app listens on 8080 only; a route to 9999 gets a forward
    // added to the running QEMU, which then reaches a closed guest port: 502.
    let (s, r) = d
        .call(
            Method::POST,
            "/routes",
            Some(json!({ "hostname": "other.localhost", "vm_id": id, "port": 9999 })),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    d.create_route("main.localhost", id).await;
    d.wait_http("main.localhost", "/").await;
    let (s, body) = d.proxy_get("other.localhost", "/").await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{body}");
    let (s, _) = d
        .call(
            Method::DELETE,
            &format!("/routes/{}", r["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = d.proxy_get("other.localhost", "/").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}
