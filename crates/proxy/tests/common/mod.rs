//! Test fixtures: fake backends, a fake resolver and a proxy runner.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hatch_proxy::{ProxyConfig, ProxyMetrics, Resolution, Resolver};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestBody = UnsyncBoxBody<Bytes, BoxError>;

/// Upper bound for anything a test waits for (never used to synchronize).
pub const LIMIT: Duration = Duration::from_secs(20);

pub async fn within<F: std::future::Future>(fut: F) -> F::Output {
    tokio::time::timeout(LIMIT, fut)
        .await
        .expect("test step timed out")
}

// ---------------------------------------------------------------- content

/// Deterministic content: byte at absolute offset `i`.
pub fn pattern_byte(i: u64) -> u8 {
    ((i.wrapping_mul(31) + (i >> 13) + 7) % 251) as u8
}

pub fn pattern(offset: u64, len: usize) -> Bytes {
    (0..len as u64).map(|i| pattern_byte(offset + i)).collect()
}

pub fn pattern_hash(total: u64) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    let mut offset = 0;
    while offset < total {
        let len = (total - offset).min(64 * 1024);
        hasher.update(&pattern(offset, len as usize));
        offset += len;
    }
    hasher.finalize()
}

pub fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> TestBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

// ---------------------------------------------------------------- backends

/// A tiny HTTP/1.1 backend. Routes:
/// - `/` -> its name
/// - `/headers` -> JSON `{backend, uri, headers: {name: [values]}}`, and a
///   response with hop-by-hop headers that the proxy must strip
/// - `/hash` -> streams the request body, answers `"<len> <blake3 hex>"`
/// - `/big?bytes=N` -> N bytes of [`pattern`], streamed in 64 KiB chunks
/// - `/echo` -> the request body streamed back
/// - `/gate` -> sends `first`, waits for [`Backend::open_gate`], sends `second`
pub struct Backend {
    pub addr: SocketAddr,
    gate: Arc<Notify>,
}

impl Backend {
    pub async fn spawn(name: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Arc::new(Notify::new());
        let gate2 = Arc::clone(&gate);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let gate = Arc::clone(&gate2);
                tokio::spawn(async move {
                    let service =
                        service_fn(move |req| backend_handle(name, Arc::clone(&gate), req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, gate }
    }

    /// Lets one pending (or the next) `/gate` response finish.
    pub fn open_gate(&self) {
        self.gate.notify_one();
    }
}

async fn backend_handle(
    name: &'static str,
    gate: Arc<Notify>,
    req: Request<Incoming>,
) -> Result<Response<TestBody>, Infallible> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let response = match path.as_str() {
        "/" => Response::new(full(name)),
        "/headers" => {
            let mut headers: HashMap<String, Vec<String>> = HashMap::new();
            for (key, value) in req.headers() {
                headers
                    .entry(key.as_str().to_owned())
                    .or_default()
                    .push(value.to_str().unwrap().to_owned());
            }
            let body = serde_json::json!({
                "backend": name,
                "uri": req.uri().to_string(),
                "headers": headers,
            });
            Response::builder()
                .header("connection", "x-hop")
                .header("x-hop", "1")
                .header("keep-alive", "timeout=5")
                .header("proxy-authenticate", "Basic")
                .header("x-backend-only", "yes")
                .body(full(body.to_string()))
                .unwrap()
        }
        "/hash" => {
            let mut body = req.into_body();
            let mut hasher = blake3::Hasher::new();
            let mut len = 0u64;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    len += data.len() as u64;
                    hasher.update(&data);
                }
            }
            Response::new(full(format!("{len} {}", hasher.finalize().to_hex())))
        }
        "/big" => {
            let total: u64 = query
                .strip_prefix("bytes=")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let (mut tx, body) = http_body_util::channel::Channel::<Bytes, BoxError>::new(2);
            tokio::spawn(async move {
                let mut offset = 0;
                while offset < total {
                    let len = (total - offset).min(64 * 1024);
                    if tx.send_data(pattern(offset, len as usize)).await.is_err() {
                        return;
                    }
                    offset += len;
                }
            });
            Response::builder()
                .header("content-length", total)
                .body(body.boxed_unsync())
                .unwrap()
        }
        "/echo" => Response::new(req.into_body().map_err(BoxError::from).boxed_unsync()),
        "/gate" => {
            let (mut tx, body) = http_body_util::channel::Channel::<Bytes, BoxError>::new(1);
            tokio::spawn(async move {
                if tx.send_data(Bytes::from_static(b"first")).await.is_err() {
                    return;
                }
                gate.notified().await;
                let _ = tx.send_data(Bytes::from_static(b"second")).await;
            });
            Response::new(body.boxed_unsync())
        }
        _ => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(full("backend 404"))
            .unwrap(),
    };
    Ok(response)
}

/// A WebSocket echo backend. Records the `X-Forwarded-Host` of each handshake.
pub struct WsBackend {
    pub addr: SocketAddr,
    pub forwarded_hosts: Arc<Mutex<Vec<String>>>,
}

impl WsBackend {
    pub async fn spawn() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let forwarded_hosts = Arc::new(Mutex::new(Vec::new()));
        let hosts = Arc::clone(&forwarded_hosts);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let hosts = Arc::clone(&hosts);
                tokio::spawn(async move {
                    // The signature is tungstenite's.
                    #[allow(clippy::result_large_err)]
                    let callback =
                        move |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                              resp| {
                            let host = req
                                .headers()
                                .get("x-forwarded-host")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned();
                            hosts.lock().unwrap().push(host);
                            Ok(resp)
                        };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await
                    else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.next().await {
                        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            forwarded_hosts,
        }
    }
}

/// An address where nothing listens.
pub async fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

// ---------------------------------------------------------------- resolver

#[derive(Default)]
pub struct FakeResolver {
    routes: Mutex<HashMap<String, Resolution>>,
    pub resolved: Mutex<Vec<String>>,
    /// vm_id -> (starts, ends)
    activity: watch::Sender<HashMap<String, (u64, u64)>>,
    /// Set if an end was ever reported without a matching start.
    unbalanced: Mutex<bool>,
}

impl FakeResolver {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn route(&self, host: &str, resolution: Resolution) {
        self.routes
            .lock()
            .unwrap()
            .insert(host.to_owned(), resolution);
    }

    pub fn backend(&self, host: &str, addr: SocketAddr, vm_id: &str) {
        self.route(
            host,
            Resolution::Backend {
                addr,
                vm_id: vm_id.to_owned(),
                track: true,
                run: 0,
            },
        );
    }

    pub fn activity(&self, vm_id: &str) -> (u64, u64) {
        self.activity
            .borrow()
            .get(vm_id)
            .copied()
            .unwrap_or_default()
    }

    /// Waits until `vm_id` saw `n` starts and as many ends.
    pub async fn wait_balanced(&self, vm_id: &str, n: u64) {
        let mut rx = self.activity.subscribe();
        let seen = within(rx.wait_for(|m| {
            let (starts, ends) = m.get(vm_id).copied().unwrap_or_default();
            starts >= n && starts == ends
        }))
        .await
        .unwrap()
        .get(vm_id)
        .copied();
        assert_eq!(seen, Some((n, n)), "activity of {vm_id}");
        assert!(!*self.unbalanced.lock().unwrap(), "end without start");
    }

    /// Waits until `vm_id` has at least `n` starts.
    pub async fn wait_started(&self, vm_id: &str, n: u64) {
        let mut rx = self.activity.subscribe();
        within(rx.wait_for(|m| m.get(vm_id).is_some_and(|(s, _)| *s >= n)))
            .await
            .unwrap();
    }
}

impl Resolver for FakeResolver {
    async fn resolve(&self, host: &str, _path: &str, _headers: &http::HeaderMap) -> Resolution {
        self.resolved.lock().unwrap().push(host.to_owned());
        let resolution = self
            .routes
            .lock()
            .unwrap()
            .get(host)
            .cloned()
            .unwrap_or(Resolution::UnknownHost);
        if let Resolution::Backend {
            vm_id, track: true, ..
        } = &resolution
        {
            self.activity
                .send_modify(|m| m.entry(vm_id.clone()).or_default().0 += 1);
        }
        resolution
    }

    fn on_request_end(&self, vm_id: &str) {
        self.activity.send_modify(|m| {
            let entry = m.entry(vm_id.to_owned()).or_default();
            entry.1 += 1;
            if entry.1 > entry.0 {
                *self.unbalanced.lock().unwrap() = true;
            }
        });
    }
}

// ---------------------------------------------------------------- proxy

pub struct Proxy {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<std::io::Result<()>>,
    pub registry: Registry,
}

impl Proxy {
    pub async fn start(resolver: Arc<FakeResolver>) -> Self {
        Self::start_with(resolver, ProxyConfig::default()).await
    }

    pub async fn start_with(resolver: Arc<FakeResolver>, config: ProxyConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut registry = Registry::default();
        let metrics = ProxyMetrics::register(&mut registry);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(hatch_proxy::serve_with_config(
            listener,
            resolver,
            metrics,
            shutdown.clone(),
            config,
        ));
        Self {
            addr,
            shutdown,
            task,
            registry,
        }
    }

    pub fn metrics_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }

    /// Stops the proxy and waits for `serve` to return.
    pub async fn stop(self) {
        self.shutdown.cancel();
        within(self.task).await.unwrap().unwrap();
    }
}

// ---------------------------------------------------------------- client

/// A client connection to the proxy (HTTP/1.1, keep-alive).
pub struct Conn {
    sender: hyper::client::conn::http1::SendRequest<TestBody>,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        Self { sender }
    }

    pub async fn send(&mut self, req: Request<TestBody>) -> Response<Incoming> {
        within(self.sender.ready()).await.unwrap();
        within(self.sender.send_request(req)).await.unwrap()
    }
}

/// Sends one request on a fresh connection.
pub async fn send(addr: SocketAddr, req: Request<TestBody>) -> Response<Incoming> {
    Conn::open(addr).await.send(req).await
}

pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Response<Incoming> {
    let req = Request::get(path)
        .header("host", host)
        .body(empty())
        .unwrap();
    send(addr, req).await
}

pub async fn body_bytes<B>(body: B) -> Bytes
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    within(body.collect()).await.unwrap().to_bytes()
}

pub async fn body_text(resp: Response<Incoming>) -> String {
    String::from_utf8(body_bytes(resp.into_body()).await.to_vec()).unwrap()
}

pub async fn body_json(resp: Response<Incoming>) -> serde_json::Value {
    serde_json::from_slice(&body_bytes(resp.into_body()).await).unwrap()
}
