//! End-to-end tests of the proxy against local fake backends.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use hatch_proxy::{ProxyConfig, Resolution};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const MIB: u64 = 1024 * 1024;

fn assert_json_error(resp: &http::Response<hyper::body::Incoming>, status: StatusCode) {
    assert_eq!(resp.status(), status);
    assert_eq!(resp.headers()["content-type"], "application/json");
}

#[tokio::test]
async fn routes_by_host_ignoring_port_and_case() {
    let alpha = Backend::spawn("alpha").await;
    let beta = Backend::spawn("beta").await;
    let resolver = FakeResolver::new();
    resolver.backend("alpha.test", alpha.addr, "vm-alpha");
    resolver.backend("beta.test", beta.addr, "vm-beta");
    let proxy = Proxy::start(resolver.clone()).await;

    let resp = get(proxy.addr, "ALPHA.Test:8080", "/").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, "alpha");

    let resp = get(proxy.addr, "beta.test", "/").await;
    assert_eq!(body_text(resp).await, "beta");

    let resp = get(proxy.addr, "Beta.Test.", "/").await;
    assert_eq!(body_text(resp).await, "beta");

    // Several requests on one keep-alive connection, to different hosts.
    let mut conn = Conn::open(proxy.addr).await;
    for (host, want) in [
        ("alpha.test:1", "alpha"),
        ("BETA.TEST", "beta"),
        ("alpha.test", "alpha"),
    ] {
        let req = Request::get("/")
            .header("host", host)
            .body(empty())
            .unwrap();
        assert_eq!(body_text(conn.send(req).await).await, want);
    }

    // Absolute-form: the URI authority wins over the Host header.
    let req = Request::get("http://Beta.TEST:9/")
        .header("host", "alpha.test")
        .body(empty())
        .unwrap();
    assert_eq!(body_text(send(proxy.addr, req).await).await, "beta");

    {
        let resolved = resolver.resolved.lock().unwrap();
        assert!(
            resolved
                .iter()
                .all(|h| h == "alpha.test" || h == "beta.test"),
            "{resolved:?}"
        );
    }
    resolver.wait_balanced("vm-alpha", 3).await;
    resolver.wait_balanced("vm-beta", 4).await;

    let text = proxy.metrics_text();
    assert!(
        text.contains(r#"hatch_proxy_requests_total{outcome="forwarded",status_class="2xx"} 7"#),
        "{text}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn unknown_host_is_404_json() {
    let resolver = FakeResolver::new();
    let proxy = Proxy::start(resolver.clone()).await;

    let resp = get(proxy.addr, "Nope.Test:8080", "/x").await;
    assert_json_error(&resp, StatusCode::NOT_FOUND);
    let json = body_json(resp).await;
    assert_eq!(json["error"]["code"], "not_found");
    assert_eq!(json["error"]["message"], "no route for host 'nope.test'");

    let text = proxy.metrics_text();
    assert!(
        text.contains(r#"hatch_proxy_requests_total{outcome="unknown_host",status_class="4xx"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"hatch_proxy_response_latency_seconds_count{outcome="unknown_host"} 1"#)
    );
    proxy.stop().await;
}

#[tokio::test]
async fn not_running_is_503_json() {
    let resolver = FakeResolver::new();
    resolver.route(
        "sleepy.test",
        Resolution::NotRunning {
            vm_id: "vm-sleepy".into(),
            state: "snapshotted".into(),
        },
    );
    let proxy = Proxy::start(resolver.clone()).await;

    let resp = get(proxy.addr, "sleepy.test", "/").await;
    assert_json_error(&resp, StatusCode::SERVICE_UNAVAILABLE);
    let json = body_json(resp).await;
    assert_eq!(json["error"]["code"], "vm_not_running");
    let message = json["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("vm-sleepy") && message.contains("snapshotted"),
        "{message}"
    );
    // Not forwarded, so no activity.
    assert_eq!(resolver.activity("vm-sleepy"), (0, 0));
    proxy.stop().await;
}

#[tokio::test]
async fn unavailable_is_503_with_its_code_and_retry_after() {
    let resolver = FakeResolver::new();
    resolver.route(
        "broken.test",
        Resolution::Unavailable {
            vm_id: "vm-broken".into(),
            code: "wake_failed",
            message: "restore failed".into(),
            retry_after_secs: 7,
        },
    );
    let proxy = Proxy::start(resolver.clone()).await;

    let resp = get(proxy.addr, "broken.test", "/").await;
    assert_json_error(&resp, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "7");
    let json = body_json(resp).await;
    assert_eq!(json["error"]["code"], "wake_failed");
    let message = json["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("vm-broken") && message.contains("restore failed"),
        "{message}"
    );
    assert_eq!(resolver.activity("vm-broken"), (0, 0));
    proxy.stop().await;
}

#[tokio::test]
async fn untracked_requests_are_forwarded_without_activity() {
    let backend = Backend::spawn("health").await;
    let resolver = FakeResolver::new();
    resolver.route(
        "health.test",
        Resolution::Backend {
            addr: backend.addr,
            vm_id: "vm-health".into(),
            track: false,
            run: 0,
        },
    );
    let proxy = Proxy::start(resolver.clone()).await;
    let resp = get(proxy.addr, "health.test", "/").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let _ = body_text(resp).await;
    assert_eq!(resolver.activity("vm-health"), (0, 0));
    proxy.stop().await;
}

/// A backend whose connections answer one request (kept alive) and reset
/// on the next, as a pooled connection to a VM's previous QEMU run does
/// once a new run serves on the same port.
async fn one_request_per_connection_backend() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = conn
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                // The next request on this connection gets a reset.
                let _ = conn.read(&mut chunk).await;
                // A zero linger makes the close a reset (it does not block).
                #[allow(deprecated)]
                let _ = conn.set_linger(Some(Duration::ZERO));
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_new_run_of_a_vm_gets_new_connections() {
    let addr = one_request_per_connection_backend().await;
    let resolver = FakeResolver::new();
    let run = |run| Resolution::Backend {
        addr,
        vm_id: "vm-runs".into(),
        track: false,
        run,
    };
    resolver.route("runs.test", run(1));
    let proxy = Proxy::start(resolver.clone()).await;
    let resp = get(proxy.addr, "runs.test", "/").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, "ok");
    // Same port, new run (a wake): the kept-alive connection of run 1 is
    // not reused, so the first request after the wake is answered.
    resolver.route("runs.test", run(2));
    let resp = get(proxy.addr, "runs.test", "/").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, "ok");
    proxy.stop().await;
}

#[tokio::test]
async fn backend_down_is_502_json() {
    let resolver = FakeResolver::new();
    resolver.backend("down.test", dead_addr().await, "vm-down");
    let proxy = Proxy::start(resolver.clone()).await;

    let resp = get(proxy.addr, "down.test", "/").await;
    assert_json_error(&resp, StatusCode::BAD_GATEWAY);
    let json = body_json(resp).await;
    assert_eq!(json["error"]["code"], "bad_gateway");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("vm-down")
    );
    resolver.wait_balanced("vm-down", 1).await;
    proxy.stop().await;
}

#[tokio::test]
async fn missing_host_is_400() {
    let resolver = FakeResolver::new();
    let proxy = Proxy::start(resolver.clone()).await;

    // hyper's low-level client sends no Host header unless told to.
    let req = Request::get("/").body(empty()).unwrap();
    let resp = send(proxy.addr, req).await;
    assert_json_error(&resp, StatusCode::BAD_REQUEST);
    assert_eq!(body_json(resp).await["error"]["code"], "bad_request");

    let req = Request::get("/")
        .header("host", "a b")
        .body(empty())
        .unwrap();
    let resp = send(proxy.addr, req).await;
    assert_json_error(&resp, StatusCode::BAD_REQUEST);
    assert!(resolver.resolved.lock().unwrap().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn forwarded_and_hop_by_hop_headers() {
    let backend = Backend::spawn("hdr").await;
    let resolver = FakeResolver::new();
    resolver.backend("app.test", backend.addr, "vm-app");
    let proxy = Proxy::start(resolver.clone()).await;

    let req = Request::get("/headers?a=1&b=two%20x")
        .header("host", "App.Test:8080")
        .header("x-forwarded-for", "203.0.113.9")
        .header("connection", "keep-alive, x-secret-hop")
        .header("x-secret-hop", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("te", "trailers")
        .header("x-end-to-end", "kept")
        .body(empty())
        .unwrap();
    let resp = send(proxy.addr, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    // Hop-by-hop headers of the backend's response are stripped too.
    let headers = resp.headers().clone();
    assert_eq!(headers["x-backend-only"], "yes");
    for name in ["x-hop", "keep-alive", "proxy-authenticate"] {
        assert!(
            !headers.contains_key(name),
            "{name} leaked to client: {headers:?}"
        );
    }
    assert!(headers.get("connection").is_none_or(|v| v != "x-hop"));

    let json = body_json(resp).await;
    let h = &json["headers"];
    assert_eq!(json["uri"], "/headers?a=1&b=two%20x");
    assert_eq!(h["host"][0], "App.Test:8080");
    assert_eq!(h["x-forwarded-for"][0], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"][0], "http");
    assert_eq!(h["x-forwarded-host"][0], "App.Test:8080");
    assert_eq!(h["x-end-to-end"][0], "kept");
    for name in [
        "x-secret-hop",
        "keep-alive",
        "proxy-authorization",
        "te",
        "upgrade",
    ] {
        assert!(h.get(name).is_none(), "{name} reached the backend: {h}");
    }
    if let Some(connection) = h.get("connection") {
        assert!(!connection.to_string().contains("x-secret-hop"));
    }

    // Absolute-form: Host is rewritten to the URI authority.
    let req = Request::get("http://App.Test:81/headers")
        .header("host", "other.test")
        .body(empty())
        .unwrap();
    let json = body_json(send(proxy.addr, req).await).await;
    assert_eq!(json["uri"], "/headers");
    assert_eq!(json["headers"]["host"][0], "App.Test:81");
    assert_eq!(json["headers"]["x-forwarded-host"][0], "App.Test:81");
    assert_eq!(json["headers"]["x-forwarded-for"][0], "127.0.0.1");

    resolver.wait_balanced("vm-app", 2).await;
    proxy.stop().await;
}

#[tokio::test]
async fn large_bodies_stream_intact() {
    let backend = Backend::spawn("big").await;
    let resolver = FakeResolver::new();
    resolver.backend("big.test", backend.addr, "vm-big");
    let proxy = Proxy::start(resolver.clone()).await;
    let total = 20 * MIB;
    let expected = pattern_hash(total);

    // Upload, chunked (no Content-Length) and with Content-Length.
    for with_length in [false, true] {
        let (mut tx, body) = http_body_util::channel::Channel::<Bytes, BoxError>::new(4);
        let producer = tokio::spawn(async move {
            let mut offset = 0;
            while offset < total {
                let len = (total - offset).min(256 * 1024);
                tx.send_data(pattern(offset, len as usize)).await.unwrap();
                offset += len;
            }
        });
        let mut req = Request::post("/hash").header("host", "big.test");
        if with_length {
            req = req.header("content-length", total);
        }
        let resp = send(proxy.addr, req.body(body.boxed_unsync()).unwrap()).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            body_text(resp).await,
            format!("{total} {}", expected.to_hex())
        );
        within(producer).await.unwrap();
    }

    // Download, hashed frame by frame.
    let resp = get(proxy.addr, "big.test", &format!("/big?bytes={total}")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-length"], total.to_string().as_str());
    let mut body = resp.into_body();
    let mut hasher = blake3::Hasher::new();
    let mut len = 0u64;
    while let Some(frame) = within(body.frame()).await {
        if let Ok(data) = frame.unwrap().into_data() {
            len += data.len() as u64;
            hasher.update(&data);
        }
    }
    assert_eq!(len, total);
    assert_eq!(hasher.finalize(), expected);

    resolver.wait_balanced("vm-big", 3).await;
    proxy.stop().await;
}

#[tokio::test]
async fn bodies_are_streamed_not_buffered() {
    let backend = Backend::spawn("stream").await;
    let resolver = FakeResolver::new();
    resolver.backend("s.test", backend.addr, "vm-s");
    let proxy = Proxy::start(resolver.clone()).await;

    // Response: the first chunk arrives while the backend is still holding the rest.
    let resp = get(proxy.addr, "s.test", "/gate").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = within(body.frame())
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(first, "first");
    assert_eq!(
        resolver.activity("vm-s"),
        (1, 0),
        "request still in progress"
    );
    backend.open_gate();
    let rest = body_bytes(body).await;
    assert_eq!(rest, "second");

    // Request and response together: each chunk comes back before the next is sent.
    let (mut tx, req_body) = http_body_util::channel::Channel::<Bytes, BoxError>::new(1);
    let req = Request::post("/echo")
        .header("host", "s.test")
        .body(req_body.boxed_unsync())
        .unwrap();
    let mut conn = Conn::open(proxy.addr).await;
    tx.send_data(Bytes::from_static(b"ping-0")).await.unwrap();
    let resp = conn.send(req).await;
    let mut body = resp.into_body();
    for round in 0..5 {
        let want = format!("ping-{round}");
        let mut got = Vec::new();
        while got.len() < want.len() {
            let frame = within(body.frame()).await.unwrap().unwrap();
            got.extend_from_slice(&frame.into_data().unwrap());
        }
        assert_eq!(String::from_utf8(got).unwrap(), want);
        if round < 4 {
            tx.send_data(Bytes::from(format!("ping-{}", round + 1)))
                .await
                .unwrap();
        }
    }
    drop(tx);
    assert!(body_bytes(body).await.is_empty());

    resolver.wait_balanced("vm-s", 2).await;
    proxy.stop().await;
}

#[tokio::test]
async fn websocket_upgrade_echo() {
    let ws_backend = WsBackend::spawn().await;
    let resolver = FakeResolver::new();
    resolver.backend("ws.test", ws_backend.addr, "vm-ws");
    let proxy = Proxy::start(resolver.clone()).await;

    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut ws, resp) = within(tokio_tungstenite::client_async(
        "ws://WS.test:8080/chat",
        stream,
    ))
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);

    for i in 0..3 {
        let text = format!("hello {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let echoed = within(ws.next()).await.unwrap().unwrap();
        assert_eq!(echoed, Message::text(text));
    }
    let blob = pattern(0, 300_000);
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(
        within(ws.next()).await.unwrap().unwrap(),
        Message::binary(blob)
    );

    // The open WebSocket keeps the VM busy.
    assert_eq!(resolver.activity("vm-ws"), (1, 0));
    assert_eq!(
        ws_backend.forwarded_hosts.lock().unwrap().as_slice(),
        ["WS.test:8080"]
    );

    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = within(ws.next()).await {}
    drop(ws);
    resolver.wait_balanced("vm-ws", 1).await;

    let text = proxy.metrics_text();
    assert!(
        text.contains(r#"hatch_proxy_requests_total{outcome="upgraded",status_class="1xx"} 1"#),
        "{text}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn declined_upgrade_is_plain_response() {
    let backend = Backend::spawn("plain").await;
    let resolver = FakeResolver::new();
    resolver.backend("plain.test", backend.addr, "vm-plain");
    let proxy = Proxy::start(resolver.clone()).await;

    let req = Request::get("/")
        .header("host", "plain.test")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .body(empty())
        .unwrap();
    let resp = send(proxy.addr, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, "plain");
    resolver.wait_balanced("vm-plain", 1).await;
    proxy.stop().await;
}

#[tokio::test]
async fn activity_callbacks_balance_under_mixed_load() {
    let backend = Backend::spawn("mix").await;
    let resolver = FakeResolver::new();
    resolver.backend("mix.test", backend.addr, "vm-mix");
    resolver.backend("dead.test", dead_addr().await, "vm-dead");
    let proxy = Proxy::start(resolver.clone()).await;

    let mut tasks = Vec::new();
    for i in 0..20 {
        let addr = proxy.addr;
        tasks.push(tokio::spawn(async move {
            let (host, path) = match i % 4 {
                0 => ("mix.test", "/"),
                1 => ("mix.test", "/big?bytes=1000000"),
                2 => ("dead.test", "/"),
                _ => ("nobody.test", "/"),
            };
            let resp = get(addr, host, path).await;
            body_bytes(resp.into_body()).await;
        }));
    }
    for task in tasks {
        within(task).await.unwrap();
    }

    // A client that goes away in the middle of a large response.
    let resp = get(proxy.addr, "mix.test", "/big?bytes=50000000").await;
    let mut body = resp.into_body();
    within(body.frame()).await.unwrap().unwrap();
    drop(body);

    // HEAD: no body is sent at all.
    let req = Request::head("/")
        .header("host", "mix.test")
        .body(empty())
        .unwrap();
    assert_eq!(send(proxy.addr, req).await.status(), StatusCode::OK);

    resolver.wait_balanced("vm-mix", 10 + 1 + 1).await;
    resolver.wait_balanced("vm-dead", 5).await;
    assert_eq!(resolver.activity("nobody"), (0, 0));
    assert!(
        proxy
            .metrics_text()
            .contains("hatch_proxy_active_requests 0")
    );
    proxy.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let backend = Backend::spawn("gs").await;
    let resolver = FakeResolver::new();
    resolver.backend("gs.test", backend.addr, "vm-gs");
    // A long grace: shutdown must not wait for idle keep-alive connections.
    let proxy = Proxy::start_with(
        resolver.clone(),
        ProxyConfig::default().with_shutdown_grace(Duration::from_secs(600)),
    )
    .await;

    // An idle keep-alive connection.
    let mut idle = Conn::open(proxy.addr).await;
    let resp = idle
        .send(
            Request::get("/")
                .header("host", "gs.test")
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(body_text(resp).await, "gs");

    // A request in flight.
    let resp = get(proxy.addr, "gs.test", "/gate").await;
    let mut body = resp.into_body();
    let first = within(body.frame())
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(first, "first");

    proxy.shutdown.cancel();
    assert!(!proxy.task.is_finished());
    backend.open_gate();
    assert_eq!(body_bytes(body).await, "second");
    within(proxy.task).await.unwrap().unwrap();

    // The listener is closed.
    assert!(TcpStream::connect(proxy.addr).await.is_err());
    resolver.wait_balanced("vm-gs", 2).await;
}

#[tokio::test]
async fn shutdown_cuts_upgraded_connections_after_grace() {
    let ws_backend = WsBackend::spawn().await;
    let resolver = FakeResolver::new();
    resolver.backend("ws.test", ws_backend.addr, "vm-ws");
    let proxy = Proxy::start_with(
        resolver.clone(),
        ProxyConfig::default().with_shutdown_grace(Duration::from_millis(100)),
    )
    .await;

    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut ws, _) = within(tokio_tungstenite::client_async("ws://ws.test/", stream))
        .await
        .unwrap();
    ws.send(Message::text("x")).await.unwrap();
    assert_eq!(
        within(ws.next()).await.unwrap().unwrap(),
        Message::text("x")
    );

    proxy.shutdown.cancel();
    within(proxy.task).await.unwrap().unwrap();
    // The spliced stream is gone: the client sees the end of the connection.
    loop {
        match within(ws.next()).await {
            None | Some(Err(_)) => break,
            Some(Ok(Message::Close(_))) => {}
            Some(Ok(other)) => panic!("unexpected message {other:?}"),
        }
    }
    resolver.wait_balanced("vm-ws", 1).await;
}
