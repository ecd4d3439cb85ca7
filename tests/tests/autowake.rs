//! Auto-wake through the proxy and idle suspend, end to end: a real daemon,
//! real QEMU guests, real Garage, real HTTP through the proxy.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hatch_e2e::{Daemon, Garage, PATIENCE, kv};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpStream;

async fn app(d: &Daemon, host: &str, path: &str) -> String {
    let (s, body) = d.proxy_get(host, path).await;
    assert_eq!(s, StatusCode::OK, "{host}{path}: {body}");
    body
}

async fn route(d: &Daemon, body: Value) -> Value {
    let (s, r) = d.call(Method::POST, "/routes", Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    r
}

async fn booted_vm(d: &Daemon) -> String {
    let id = d.create_vm(json!({ "name": "app" })).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    d.wait_state(&id, "running").await;
    id
}

async fn events(d: &Daemon, id: &str) -> Vec<Value> {
    let (s, e) = d
        .call(Method::GET, &format!("/vms/{id}/events"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{e}");
    e["events"].as_array().unwrap().clone()
}

fn of_kind<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["kind"] == kind).collect()
}

#[tokio::test]
async fn an_idle_vm_is_suspended_and_200_concurrent_requests_wake_it_once() {
    let garage = Garage::start().await;
    let d = Daemon::start_with_env(garage.env()).await;
    let id = booted_vm(&d).await;
    let r = route(
        &d,
        json!({ "hostname": "app.localhost", "vm_id": id, "idle_timeout_seconds": 2 }),
    )
    .await;
    assert_eq!(r["idle_timeout_seconds"], 2);
    let boot_id = kv(&d.wait_http("app.localhost", "/").await, "boot_id");
    for n in 1..=3 {
        assert_eq!(
            app(&d, "app.localhost", "/counter").await,
            format!("counter={n}\n")
        );
    }

    // Nobody asks for 2 s: the VM is suspended, by an `idle` snapshot.
    d.wait_state(&id, "snapshotted").await;
    let (_, snaps) = d
        .call(Method::GET, &format!("/vms/{id}/snapshots"), None)
        .await;
    let newest = &snaps["snapshots"][0];
    assert_eq!(newest["trigger"], "idle", "{snaps}");
    assert!(d.qemu_pids().is_empty(), "a suspended VM has no QEMU");
    let (_, routes) = d.call(Method::GET, "/routes", None).await;
    assert_eq!(routes["routes"][0]["vm_state"], "snapshotted", "{routes}");

    // 200 requests at once: one wake, every request answered in order of
    // the guest's counter, continuing from before the suspend.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let (http, proxy) = (d.http.clone(), d.proxy_addr);
        set.spawn(async move {
            // Bounded, so that a lost request is reported with the others'
            // outcome rather than hanging the test.
            let sent = http
                .get(format!("http://{proxy}/counter"))
                .header("host", "app.localhost")
                .timeout(std::time::Duration::from_secs(90))
                .send()
                .await;
            match sent {
                Ok(resp) => {
                    let status = resp.status();
                    (Some(status), resp.text().await.unwrap_or_default())
                }
                Err(e) => (None, e.to_string()),
            }
        });
    }
    let mut counters = Vec::new();
    let mut failed = Vec::new();
    while let Some(r) = set.join_next().await {
        match r.unwrap() {
            (Some(StatusCode::OK), body) => {
                counters.push(kv(&body, "counter").parse::<u64>().unwrap())
            }
            other => failed.push(other),
        }
    }
    assert!(
        failed.is_empty(),
        "{} of 200 answered; the others: {failed:?}\n{}",
        counters.len(),
        d.daemon_log()
    );
    counters.sort_unstable();
    assert_eq!(
        counters,
        (4..204).collect::<Vec<u64>>(),
        "each value seen once"
    );

    let ev = events(&d, &id).await;
    let wakes = of_kind(&ev, "wake");
    assert_eq!(
        wakes.len(),
        1,
        "single-flight: one wake for 200 requests: {ev:?}"
    );
    assert_eq!(wakes[0]["trigger"], "request");
    assert!(
        wakes[0]["error"].is_null() && wakes[0]["duration_ms"].is_u64(),
        "{ev:?}"
    );
    let idle = of_kind(&ev, "idle_suspend");
    assert_eq!(idle.len(), 1, "{ev:?}");
    assert_eq!(idle[0]["snapshot_id"], newest["id"]);

    assert_eq!(kv(&app(&d, "app.localhost", "/").await, "boot_id"), boot_id);
    let text = d.metrics_text().await;
    assert!(
        text.contains(r#"hatch_wakes_total{trigger="request",result="ok"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"hatch_idle_suspends_total{result="ok"} 1"#),
        "{text}"
    );
    assert!(text.contains("hatch_wake_duration_seconds_count"), "{text}");
}

#[tokio::test]
async fn a_request_during_a_suspend_is_served_after_the_wake_and_no_auto_wake_gives_503() {
    let garage = Garage::start().await;
    let d = Daemon::start_with_env(garage.env()).await;
    let id = booted_vm(&d).await;
    route(&d, json!({ "hostname": "app.localhost", "vm_id": id })).await;
    route(
        &d,
        json!({ "hostname": "nowake.localhost", "vm_id": id, "auto_wake": false }),
    )
    .await;
    let boot_id = kv(&d.wait_http("app.localhost", "/").await, "boot_id");
    assert_eq!(app(&d, "app.localhost", "/counter").await, "counter=1\n");

    // The suspend has begun (the VM is `snapshotting`) when this request
    // arrives: it waits, and the VM is woken right after.
    d.snapshot(&id, true).await;
    assert_eq!(d.vm(&id).await["state"], "snapshotting");
    assert_eq!(app(&d, "app.localhost", "/counter").await, "counter=2\n");
    assert_eq!(d.vm(&id).await["state"], "running");
    assert_eq!(kv(&app(&d, "app.localhost", "/").await, "boot_id"), boot_id);
    let ev = events(&d, &id).await;
    assert_eq!(of_kind(&ev, "wake").len(), 1, "{ev:?}");

    // Without auto-wake: 503 at once, and the VM stays suspended.
    d.snapshot(&id, true).await;
    d.wait_state(&id, "snapshotted").await;
    let (s, body) = d.proxy_get("nowake.localhost", "/counter").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let err: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["code"], "vm_not_running");
    assert_eq!(d.vm(&id).await["state"], "snapshotted");
    assert_eq!(of_kind(&events(&d, &id).await, "wake").len(), 1);
}

#[tokio::test]
async fn a_failed_wake_answers_503_with_retry_after_and_the_vm_stays_restorable() {
    let mut garage = Garage::start().await;
    let d = Daemon::start_with_env(garage.env()).await;
    let id = booted_vm(&d).await;
    route(&d, json!({ "hostname": "app.localhost", "vm_id": id })).await;
    let boot_id = kv(&d.wait_http("app.localhost", "/").await, "boot_id");
    assert_eq!(app(&d, "app.localhost", "/counter").await, "counter=1\n");
    let sid = d.snapshot(&id, true).await;
    d.wait_snapshot(&id, &sid, "ready").await;
    d.wait_state(&id, "snapshotted").await;

    // The wake cannot succeed: the saved device state is broken and S3 is
    // gone.
    let good = d.break_local_state(&sid);
    garage.stop();
    let resp = d
        .http
        .get(format!("http://{}/counter", d.proxy_addr))
        .header("host", "app.localhost")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1, "Retry-After: {retry}");
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "wake_failed", "{err}");
    assert!(
        err["error"]["message"].as_str().unwrap().contains(&sid),
        "{err}"
    );
    let vm = d.vm(&id).await;
    assert_eq!(vm["state"], "snapshotted", "{vm}");
    assert!(d.qemu_pids().is_empty());
    let ev = events(&d, &id).await;
    let wakes = of_kind(&ev, "wake");
    assert_eq!(wakes.len(), 1, "{ev:?}");
    assert!(
        wakes[0]["error"].as_str().unwrap().contains("restore of"),
        "{ev:?}"
    );

    // Nothing was lost: with the state repaired the VM restores from its
    // local copy alone and continues.
    d.repair_local_state(&sid, good);
    d.restore(&id, json!({})).await;
    assert_eq!(kv(&app(&d, "app.localhost", "/").await, "boot_id"), boot_id);
    assert_eq!(app(&d, "app.localhost", "/counter").await, "counter=2\n");
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// Open a WebSocket through the proxy with a real client library.
async fn websocket(d: &Daemon, host: &str) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{}/ws", d.proxy_addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("host", host.parse().unwrap());
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

async fn echo(ws: &mut Ws, msg: &str) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::text(msg)).await.unwrap();
    let back = ws.next().await.unwrap().unwrap();
    assert_eq!(back, Message::text(msg));
}

#[tokio::test]
async fn an_open_websocket_keeps_a_vm_awake_and_health_checks_do_not() {
    let garage = Garage::start().await;
    let d = Daemon::start_with_env(garage.env()).await;
    let id = booted_vm(&d).await;
    route(
        &d,
        json!({ "hostname": "app.localhost", "vm_id": id, "idle_timeout_seconds": 1,
                "idle_ignore_paths": ["/disk/read"] }),
    )
    .await;
    d.wait_http("app.localhost", "/").await;

    let mut ws = websocket(&d, "app.localhost").await;
    echo(&mut ws, "ping-1").await;
    // Only the absence of a suspend can be observed here: several idle
    // timeouts pass with the connection open and silent.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(d.vm(&id).await["state"], "running");
    echo(&mut ws, "ping-2").await;
    drop(ws);
    // Closed: now the VM is idle.
    d.wait_state(&id, "snapshotted").await;

    // Wake it, then poll only the health-check path: it is suspended anyway.
    assert_eq!(app(&d, "app.localhost", "/counter").await, "counter=1\n");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while d.vm(&id).await["state"] != "snapshotted" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "health checks kept the VM awake"
        );
        let (s, _) = d.proxy_get("app.localhost", "/disk/read?name=health").await;
        assert!(s != StatusCode::BAD_GATEWAY, "{s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A health check does not wake it either.
    let (s, body) = d.proxy_get("app.localhost", "/disk/read?name=health").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("vm_not_running"), "{body}");
    assert_eq!(d.vm(&id).await["state"], "snapshotted");
    // A real request does, and the guest continues.
    assert_eq!(app(&d, "app.localhost", "/counter").await, "counter=2\n");
}
