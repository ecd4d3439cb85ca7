//! Accept loop, per-connection serving and request forwarding.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header;
use http::uri::{PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::body::{ActivityGuard, ProxyBody};
use crate::error::ProxyError;
use crate::headers::{self as hdr, TargetHost};
use crate::metrics::{Outcome, ProxyMetrics};
use crate::{Resolution, Resolver};

/// Tunables of [`serve_with_config`]. [`serve`] uses [`ProxyConfig::default`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProxyConfig {
    /// After shutdown is requested, how long in-flight requests and upgraded
    /// connections may run before they are cut. Default 10 s.
    pub shutdown_grace: Duration,
    /// Timeout for establishing a TCP connection to a backend. Default 5 s.
    pub connect_timeout: Duration,
    /// How long an idle pooled backend connection is kept. Default 30 s.
    pub pool_idle_timeout: Duration,
    /// Maximum idle pooled connections per backend address. Default 32.
    pub pool_max_idle_per_host: usize,
    /// How long a client may take to send a request head. Default 30 s.
    pub header_read_timeout: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            shutdown_grace: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            pool_idle_timeout: Duration::from_secs(30),
            pool_max_idle_per_host: 32,
            header_read_timeout: Duration::from_secs(30),
        }
    }
}

impl ProxyConfig {
    /// Sets [`ProxyConfig::shutdown_grace`].
    pub fn with_shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Sets [`ProxyConfig::connect_timeout`].
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`ProxyConfig::pool_idle_timeout`].
    pub fn with_pool_idle_timeout(mut self, timeout: Duration) -> Self {
        self.pool_idle_timeout = timeout;
        self
    }

    /// Sets [`ProxyConfig::pool_max_idle_per_host`].
    pub fn with_pool_max_idle_per_host(mut self, max: usize) -> Self {
        self.pool_max_idle_per_host = max;
        self
    }

    /// Sets [`ProxyConfig::header_read_timeout`].
    pub fn with_header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }
}

type BackendClient = Client<HttpConnector, Incoming>;

struct Shared<R> {
    resolver: Arc<R>,
    metrics: ProxyMetrics,
    /// For other nodes and the API (long-lived backends).
    client: BackendClient,
    /// Builds a client with the configured pool.
    new_client: Box<dyn Fn() -> BackendClient + Send + Sync>,
    /// Each VM's client (its connection pool) for its current QEMU run;
    /// replaced, and the earlier run's idle connections closed, when the
    /// run changes.
    vm_clients: std::sync::Mutex<std::collections::HashMap<String, (u64, BackendClient)>>,
    /// Tracks connection tasks and upgraded-stream tasks.
    tracker: TaskTracker,
    /// Graceful shutdown requested.
    shutdown: CancellationToken,
    /// Grace period over: cut everything.
    hard_stop: CancellationToken,
}

/// Runs the proxy on `listener` until `shutdown` is cancelled, with the default
/// [`ProxyConfig`].
///
/// On shutdown it stops accepting (the listener is dropped), lets in-flight
/// requests finish and closes idle keep-alive connections, and cuts whatever is
/// still open after [`ProxyConfig::shutdown_grace`]. Returns once every
/// connection task has ended.
pub async fn serve<R: Resolver>(
    listener: TcpListener,
    resolver: Arc<R>,
    metrics: ProxyMetrics,
    shutdown: CancellationToken,
) -> io::Result<()> {
    serve_with_config(
        listener,
        resolver,
        metrics,
        shutdown,
        ProxyConfig::default(),
    )
    .await
}

/// [`serve`] with explicit tunables.
pub async fn serve_with_config<R: Resolver>(
    listener: TcpListener,
    resolver: Arc<R>,
    metrics: ProxyMetrics,
    shutdown: CancellationToken,
    config: ProxyConfig,
) -> io::Result<()> {
    let local_addr = listener.local_addr()?;
    info!(%local_addr, "proxy listening");

    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(config.connect_timeout));
    let new_client = move || {
        Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .build(connector.clone())
    };
    let client = new_client();

    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .keep_alive(true);

    let shared = Arc::new(Shared {
        resolver,
        metrics,
        client,
        new_client: Box::new(new_client),
        vm_clients: Default::default(),
        tracker: TaskTracker::new(),
        shutdown: shutdown.clone(),
        hard_stop: CancellationToken::new(),
    });

    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let shared = Arc::clone(&shared);
                let http = http.clone();
                shared
                    .tracker
                    .clone()
                    .spawn(serve_connection(shared, http, stream, peer));
            }
            Err(err) if is_per_connection_error(&err) => {
                debug!(error = %err, "accept failed for one connection");
            }
            Err(err) => {
                // E.g. out of file descriptors: back off instead of spinning.
                warn!(error = %err, "accept failed; backing off");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }

    drop(listener);
    shared.tracker.close();
    let open = shared.tracker.len();
    info!(%local_addr, open_connections = open, "proxy stopped accepting; draining");
    if tokio::time::timeout(config.shutdown_grace, shared.tracker.wait())
        .await
        .is_err()
    {
        warn!(
            open_connections = shared.tracker.len(),
            "proxy shutdown grace period over; closing remaining connections"
        );
        shared.hard_stop.cancel();
        shared.tracker.wait().await;
    }
    info!(%local_addr, "proxy stopped");
    Ok(())
}

fn is_per_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

async fn serve_connection<R: Resolver>(
    shared: Arc<Shared<R>>,
    http: http1::Builder,
    stream: TcpStream,
    peer: SocketAddr,
) {
    if let Err(err) = stream.set_nodelay(true) {
        debug!(%peer, error = %err, "set_nodelay failed");
    }
    let service = {
        let shared = Arc::clone(&shared);
        service_fn(move |req| {
            let shared = Arc::clone(&shared);
            async move { Ok::<_, Infallible>(handle(shared, req, peer).await) }
        })
    };
    let conn = http
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);

    let result = tokio::select! {
        result = conn.as_mut() => Some(result),
        () = shared.shutdown.cancelled() => {
            // Finish the request in progress (if any), then close.
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                result = conn.as_mut() => Some(result),
                () = shared.hard_stop.cancelled() => None,
            }
        }
    };
    match result {
        Some(Ok(())) => {}
        Some(Err(err)) => debug!(%peer, error = %err, "client connection ended with error"),
        None => debug!(%peer, "client connection cut at shutdown"),
    }
}

async fn handle<R: Resolver>(
    shared: Arc<Shared<R>>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let (response, outcome) = match proxy_request(&shared, req, peer).await {
        Ok(answer) => answer,
        Err(err) => {
            let outcome = err.outcome();
            (err.into_response(), outcome)
        }
    };
    shared
        .metrics
        .observe(outcome, response.status(), started.elapsed());
    response
}

async fn proxy_request<R: Resolver>(
    shared: &Arc<Shared<R>>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<(Response<ProxyBody>, Outcome), ProxyError> {
    if req.method() == Method::CONNECT {
        return Err(ProxyError::ConnectNotSupported);
    }
    let (parts, body) = req.into_parts();
    let target = match hdr::target_host(&parts) {
        Ok(target) => target,
        Err(err) => {
            debug!(%peer, error = %err, "rejecting request");
            return Err(err);
        }
    };
    let mut req = Request::from_parts(parts, body);
    let path = req.uri().path().to_owned();
    match shared
        .resolver
        .resolve(&target.route, &path, req.headers())
        .await
    {
        Resolution::UnknownHost => {
            debug!(host = %target.route, "no route");
            Err(ProxyError::UnknownHost(target.route))
        }
        Resolution::NotRunning { vm_id, state } => {
            debug!(host = %target.route, %vm_id, %state, "VM not running");
            Err(ProxyError::NotRunning { vm_id, state })
        }
        Resolution::Unavailable {
            vm_id,
            code,
            message,
            retry_after_secs,
        } => {
            debug!(host = %target.route, %vm_id, code, "VM unavailable");
            Err(ProxyError::Unavailable {
                vm_id,
                code,
                message,
                retry_after_secs,
            })
        }
        Resolution::Backend {
            addr,
            vm_id,
            track,
            run,
        } => {
            let client = shared.client_for(&vm_id, run);
            forward(shared, &client, req, peer, target, addr, vm_id, track).await
        }
        Resolution::Peer {
            addr,
            vm_id,
            header: (name, value),
        } => {
            debug!(host = %target.route, %vm_id, node = %addr, "forwarding to another node");
            req.headers_mut().insert(name, value);
            forward(
                shared,
                &shared.client,
                req,
                peer,
                target,
                addr,
                vm_id,
                false,
            )
            .await
        }
        Resolution::Forbidden { message } => {
            debug!(host = %target.route, %message, "refused");
            Err(ProxyError::Forbidden(message))
        }
    }
}

impl<R> Shared<R> {
    /// The client for VM `vm_id`'s run `run` (the API's, with no VM id,
    /// is the shared one).
    fn client_for(&self, vm_id: &str, run: u64) -> BackendClient {
        if vm_id.is_empty() {
            return self.client.clone();
        }
        let mut clients = self.vm_clients.lock().unwrap_or_else(|p| p.into_inner());
        match clients.get(vm_id) {
            Some((r, client)) if *r == run => client.clone(),
            _ => {
                let client = (self.new_client)();
                clients.insert(vm_id.to_string(), (run, client.clone()));
                client
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn forward<R: Resolver>(
    shared: &Arc<Shared<R>>,
    client: &BackendClient,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    target: TargetHost,
    addr: SocketAddr,
    vm_id: String,
    track: bool,
) -> Result<(Response<ProxyBody>, Outcome), ProxyError> {
    let guard = ActivityGuard::start(&shared.resolver, &vm_id, track, &shared.metrics);

    let upgrade = hdr::is_upgrade_request(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    parts.uri = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(addr.to_string())
        .path_and_query(path)
        .build()
        .map_err(|err| ProxyError::Internal(format!("backend URI: {err}")))?;
    parts.version = Version::HTTP_11;
    parts.extensions.clear();
    hdr::strip_hop_by_hop(&mut parts.headers, upgrade);
    // The proxy already answered any `Expect: 100-continue` itself.
    parts.headers.remove(header::EXPECT);
    if target.from_uri {
        parts.headers.insert(header::HOST, target.original.clone());
    }
    hdr::set_forwarded(&mut parts.headers, peer.ip(), target.original);

    let method = parts.method.clone();
    debug!(%vm_id, %addr, %method, uri = %parts.uri, upgrade, "forwarding");
    let mut response = match client.request(Request::from_parts(parts, body)).await {
        Ok(response) => response,
        Err(err) => {
            let detail = error_chain(&err);
            warn!(%vm_id, %addr, %method, error = %detail, "backend request failed");
            return Err(if err.is_connect() {
                ProxyError::BackendConnect { vm_id }
            } else {
                ProxyError::BackendFailed { vm_id }
            });
        }
    };

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            warn!(%vm_id, %addr, "backend sent 101 to a request without Upgrade");
            return Err(ProxyError::UnexpectedUpgrade { vm_id });
        };
        let backend_upgrade = hyper::upgrade::on(&mut response);
        let (mut parts, _empty) = response.into_parts();
        parts.extensions.clear();
        hdr::strip_hop_by_hop(&mut parts.headers, true);
        let hard_stop = shared.hard_stop.clone();
        shared.tracker.spawn(async move {
            let _guard = guard;
            let (client, backend) = match tokio::join!(client_upgrade, backend_upgrade) {
                (Ok(client), Ok(backend)) => (client, backend),
                (client, backend) => {
                    debug!(
                        %vm_id,
                        client_ok = client.is_ok(),
                        backend_ok = backend.is_ok(),
                        "upgrade did not complete"
                    );
                    return;
                }
            };
            let mut client = TokioIo::new(client);
            let mut backend = TokioIo::new(backend);
            tokio::select! {
                result = tokio::io::copy_bidirectional(&mut client, &mut backend) => match result {
                    Ok((up, down)) => debug!(%vm_id, up, down, "upgraded connection closed"),
                    Err(err) => debug!(%vm_id, error = %err, "upgraded connection ended with error"),
                },
                () = hard_stop.cancelled() => debug!(%vm_id, "upgraded connection cut at shutdown"),
            }
        });
        return Ok((
            Response::from_parts(parts, ProxyBody::empty()),
            Outcome::Upgraded,
        ));
    }

    let (mut parts, body) = response.into_parts();
    parts.extensions.clear();
    hdr::strip_hop_by_hop(&mut parts.headers, false);
    if upgrade {
        // The backend declined the upgrade; the client connection stays HTTP.
        debug!(%vm_id, status = %parts.status, "backend declined upgrade");
    }
    Ok((
        Response::from_parts(parts, ProxyBody::streaming(body, guard)),
        Outcome::Forwarded,
    ))
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
