//! The Hatch reverse proxy: routes HTTP requests to VMs by their `Host` header.
//!
//! The daemon supplies a [`Resolver`] that maps a normalized host name to a
//! [`Resolution`] (and may wait inside [`Resolver::resolve`], e.g. while it wakes a
//! snapshotted VM), plus a [`ProxyMetrics`] registered in its Prometheus registry,
//! and runs [`serve`] on a bound listener until a cancellation token fires.
//!
//! Behaviour in short:
//! - The route key is the `Host` header (or the URI authority of an absolute-form
//!   request), lower-cased, without port and without a trailing dot.
//! - Errors produced by the proxy itself are JSON
//!   `{"error": {"code": "...", "message": "..."}}`: 400 `bad_request`,
//!   404 `not_found`, 405 `method_not_allowed` (CONNECT), 503 `vm_not_running`,
//!   502 `bad_gateway`.
//! - Requests are forwarded over pooled HTTP/1.1 connections with streaming bodies
//!   in both directions; `Upgrade` requests (WebSocket and others) are spliced
//!   byte-for-byte once the backend answers `101 Switching Protocols`.
//! - A request the resolver routes to a backend with `track: true` counts as
//!   started when [`Resolver::resolve`] returns; [`Resolver::on_request_end`]
//!   reports its end when the response body has been sent (or dropped), or,
//!   for an upgraded connection, when the spliced stream closes.
//! - The resolver may answer [`Resolution::Unavailable`] (e.g. a wake failed):
//!   503 with its error code and a `Retry-After` header.

mod body;
mod error;
mod headers;
mod metrics;
mod server;

use std::future::Future;
use std::net::SocketAddr;

/// Hop-by-hop header handling, shared with the API's forwarding of
/// upgraded calls between nodes.
pub use headers::{is_upgrade_request, strip_hop_by_hop};
pub use metrics::ProxyMetrics;
pub use server::{ProxyConfig, serve, serve_with_config};

/// Where a host name leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Forward to this address (the VM's forwarded guest port on the host).
    Backend {
        /// Backend socket address, typically `127.0.0.1:<hostfwd port>`.
        addr: SocketAddr,
        /// The VM serving this host; passed to the activity callbacks.
        vm_id: String,
        /// The resolver counted this request as activity of the VM and wants
        /// [`Resolver::on_request_end`] when it is over. False for requests
        /// that must not keep a VM awake (health checks).
        track: bool,
        /// Which run of the VM's QEMU serves (any value that changes when
        /// it is replaced, e.g. its pid). A VM keeps its host port across
        /// a suspend and wake, so keep-alive connections to the earlier run
        /// would be reused and reset: each run gets a connection pool of
        /// its own.
        run: u64,
    },
    /// No route for this host: 404 `not_found`.
    UnknownHost,
    /// A route exists but its VM cannot serve now (and will not be woken):
    /// 503 `vm_not_running`.
    NotRunning {
        /// The VM behind the route.
        vm_id: String,
        /// Its current state, e.g. `stopped` or `snapshotted`.
        state: String,
    },
    /// The VM runs on another node of the cluster: forward there (to that
    /// node's cluster address), adding `header` (the signed hop that node
    /// checks). Not tracked here: the node that runs the VM counts it.
    Peer {
        /// The other node's cluster address.
        addr: SocketAddr,
        /// The VM serving this host.
        vm_id: String,
        /// Set on the forwarded request (replacing any the client sent).
        header: (http::HeaderName, http::HeaderValue),
    },
    /// The request may not be served here: 403 `forbidden` (e.g. a hop
    /// between nodes whose signature does not verify).
    Forbidden {
        /// Human-readable reason.
        message: String,
    },
    /// The VM could not be made ready in time (its wake failed or took too
    /// long): 503 with this error code and `Retry-After: retry_after_secs`.
    Unavailable {
        /// The VM behind the route.
        vm_id: String,
        /// snake_case error code, e.g. `wake_failed`.
        code: &'static str,
        /// Human-readable reason.
        message: String,
        /// Seconds the client should wait before retrying.
        retry_after_secs: u64,
    },
}

/// Maps host names to backends and observes request activity per VM.
///
/// One value is shared by all connections (`Arc<R>`), so implementations must be
/// cheap to call concurrently.
pub trait Resolver: Send + Sync + 'static {
    /// Resolves a normalized host name (lower-case, no port, no trailing dot;
    /// IPv6 literals without brackets).
    ///
    /// May wait (for example while a snapshotted VM is restored); the time spent
    /// here counts toward the proxy's latency histogram. Dropped without
    /// completion if the client goes away or the proxy is hard-stopped.
    /// `path` is the request's path (no query), for decisions such as "health
    /// checks do not count as activity"; `headers` are the request's (for
    /// example to check a signed hop between nodes).
    ///
    /// Returning [`Resolution::Backend`] with `track: true` marks the start
    /// of a request to that VM (counted before the proxy forwards it, so
    /// that idle detection never acts in between).
    fn resolve(
        &self,
        host: &str,
        path: &str,
        headers: &http::HeaderMap,
    ) -> impl Future<Output = Resolution> + Send;

    /// Called exactly once for each [`Resolution::Backend`] with
    /// `track: true`, when that request is over: its response body was fully sent or dropped, the backend
    /// failed (502), or, for an upgraded (WebSocket) connection, the spliced
    /// stream closed. May be called from a `Drop` implementation, so it must not
    /// block or panic.
    fn on_request_end(&self, vm_id: &str);
}
