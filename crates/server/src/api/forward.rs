//! API calls that act on a VM another node runs are carried out by that
//! node: the request goes unchanged (the caller's key included: keys live in
//! the shared database) to the owner's cluster address as a signed hop for
//! [`API_HOST`], and the owner's answer comes back as it is. Reads that the
//! shared database answers (the VM, its snapshots, events, retention) stay
//! on the node that received them.

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, Method, header};

use super::App;
use crate::cluster::takeover::Claimed;
use crate::error::ApiError;
use crate::resolver::API_HOST;

/// Largest request body looked into (for the `vm_id` of a new route).
const MAX_PEEKED_BODY: usize = 64 << 10;

pub async fn to_owner(State(app): App, req: Request, next: Next) -> Response {
    // A call another node forwarded (a valid hop) is answered here, never
    // sent on.
    let hop = req.headers().get(crate::cluster::hop::HEADER);
    let forwarded = hop.is_some_and(|h| {
        app.vms
            .hop
            .as_ref()
            .is_some_and(|key| key.verify(Some(h), API_HOST).is_ok())
    });
    if !app.vms.shares_state() || forwarded {
        return next.run(req).await;
    }
    let (req, vm) = match acted_on_vm(req).await {
        Ok(found) => found,
        Err(e) => return e.into_response(),
    };
    let Some(vm) = vm else {
        return next.run(req).await;
    };
    let Ok(id) = app.vms.resolve(&vm).await else {
        return next.run(req).await; // not found: answered there
    };
    if app.vms.runs_here(&id) {
        return next.run(req).await;
    }
    let mut remote = match app.vms.peers.remote(&id).await {
        Ok(Some(remote)) => remote,
        Ok(None) => return next.run(req).await,
        Err(e) => return ApiError::from(e).into_response(),
    };
    if !remote.up {
        // A suspended VM of a lost node is placed on a node (this one, or
        // the least loaded) and the call carried out there.
        remote = match app.vms.adopt(&id).await {
            Ok(Some(Claimed::Here(_))) => return next.run(req).await,
            Ok(Some(Claimed::Elsewhere)) => match app.vms.peers.remote(&id).await {
                Ok(Some(placed)) if placed.up => placed,
                Ok(Some(placed)) => return ApiError::NodeDown(placed.node).into_response(),
                Ok(None) => return next.run(req).await,
                Err(e) => return ApiError::from(e).into_response(),
            },
            // Not claimable by this node: another node may have claimed it
            // first (even for this one); ask the database again.
            Ok(None) => {
                app.vms.peers.forget(&id);
                match app.vms.peers.remote(&id).await {
                    Ok(Some(owner)) if owner.up => owner,
                    Ok(Some(_)) => return ApiError::NodeDown(remote.node).into_response(),
                    Ok(None) => return next.run(req).await,
                    Err(e) => return ApiError::from(e).into_response(),
                }
            }
            Err(e) => return ApiError::from(e).into_response(),
        };
    }
    let (Some(addr), Some(key)) = (remote.addr, &app.vms.hop) else {
        return next.run(req).await; // refused there, naming the owner
    };
    match forward(req, addr, key.sign(API_HOST)).await {
        Ok(response) => response,
        Err(e) => {
            tracing::warn!(node = %remote.node, error = %e, "forwarding an API call failed");
            ApiError::NodeUnreachable(remote.node).into_response()
        }
    }
}

/// The VM (id or name) a request acts on, if it acts on one; the request
/// is handed back whole (its body re-attached if it was read).
async fn acted_on_vm(req: Request) -> Result<(Request, Option<String>), ApiError> {
    let segments: Vec<String> = req
        .uri()
        .path()
        .trim_start_matches('/')
        .split('/')
        .map(str::to_string)
        .collect();
    let method = req.method().clone();
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let vm = match (&method, segs.as_slice()) {
        // Answered from the shared database by any node.
        (&Method::GET, ["vms", _])
        | (&Method::GET, ["vms", _, "snapshots" | "events" | "retention"])
        | (&Method::GET, ["vms", _, "snapshots", _]) => None,
        (_, ["vms", id, ..]) if !id.is_empty() => Some(id.to_string()),
        (&Method::POST, ["routes"]) => {
            let (parts, body) = req.into_parts();
            let bytes = to_bytes(body, MAX_PEEKED_BODY)
                .await
                .map_err(|_| ApiError::BadRequest("request body too large".into()))?;
            let vm = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["vm_id"].as_str().map(str::to_string));
            return Ok((Request::from_parts(parts, Body::from(bytes)), vm));
        }
        _ => None,
    };
    Ok((req, vm))
}

/// Send `method path` (no body) to node `node`'s API with the caller's
/// `Authorization`, as a signed hop; answers that node's response.
pub async fn call_node(
    app: &super::AppState,
    vm_id: &str,
    method: Method,
    path: &str,
    authorization: Option<http::HeaderValue>,
) -> Response {
    app.vms.peers.forget(vm_id);
    let remote = match app.vms.peers.remote(vm_id).await {
        Ok(Some(remote)) => remote,
        Ok(None) => return ApiError::not_found("vm", vm_id).into_response(),
        Err(e) => return ApiError::from(e).into_response(),
    };
    let (Some(addr), Some(key)) = (remote.addr, &app.vms.hop) else {
        return ApiError::NodeUnreachable(remote.node).into_response();
    };
    let mut req = Request::new(Body::empty());
    *req.method_mut() = method;
    *req.uri_mut() = match path.parse() {
        Ok(uri) => uri,
        Err(_) => return ApiError::BadRequest(format!("bad path {path}")).into_response(),
    };
    if let Some(auth) = authorization {
        req.headers_mut().insert(header::AUTHORIZATION, auth);
    }
    match forward(req, addr, key.sign(API_HOST)).await {
        Ok(response) => response,
        Err(e) => {
            tracing::warn!(node = %remote.node, error = %e, "calling another node failed");
            ApiError::NodeUnreachable(remote.node).into_response()
        }
    }
}

async fn forward(
    req: Request,
    addr: std::net::SocketAddr,
    hop: (http::HeaderName, http::HeaderValue),
) -> anyhow::Result<Response> {
    if hatch_proxy::is_upgrade_request(req.headers()) {
        return forward_upgrade(req, addr, hop).await;
    }
    let (hop_name, hop_value) = hop;
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut headers = end_to_end(&parts.headers);
    headers.insert(header::HOST, http::HeaderValue::from_static(API_HOST));
    headers.insert(hop_name, hop_value);
    let answer = crate::cluster::peers::client()
        .request(parts.method, format!("http://{addr}{path}"))
        .headers(headers)
        .body(reqwest::Body::wrap_stream(body.into_data_stream()))
        .send()
        .await?;
    let mut response = Response::builder().status(answer.status());
    if let Some(h) = response.headers_mut() {
        *h = end_to_end(answer.headers());
    }
    Ok(response
        .body(Body::from_stream(answer.bytes_stream()))
        .unwrap_or_else(|_| ApiError::Internal(anyhow::anyhow!("bad answer")).into_response()))
}

/// An upgrade (the exec WebSocket) sent on to the owner over a connection
/// of its own: once both sides have switched protocols, the caller's
/// connection and the owner's are spliced until either closes. An owner
/// that refuses (401, 404, 409, ...) answers as it is.
async fn forward_upgrade(
    mut req: Request,
    addr: std::net::SocketAddr,
    (hop_name, hop_value): (http::HeaderName, http::HeaderValue),
) -> anyhow::Result<Response> {
    use hyper_util::rt::TokioIo;

    let caller = hyper::upgrade::on(&mut req);
    let (mut parts, _no_body) = req.into_parts();
    parts.uri = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .parse()?;
    parts.extensions.clear();
    hatch_proxy::strip_hop_by_hop(&mut parts.headers, true);
    parts.headers.remove(crate::cluster::hop::HEADER);
    parts
        .headers
        .insert(header::HOST, http::HeaderValue::from_static(API_HOST));
    parts.headers.insert(hop_name, hop_value);
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "forwarded upgrade connection ended");
        }
    });
    let mut answer = sender
        .send_request(Request::from_parts(parts, Body::empty()))
        .await?;
    if answer.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        let (mut parts, body) = answer.into_parts();
        hatch_proxy::strip_hop_by_hop(&mut parts.headers, false);
        return Ok(Response::from_parts(parts, Body::new(body)));
    }
    let owner = hyper::upgrade::on(&mut answer);
    let (mut parts, _empty) = answer.into_parts();
    parts.extensions.clear();
    hatch_proxy::strip_hop_by_hop(&mut parts.headers, true);
    tokio::spawn(async move {
        let (Ok(caller), Ok(owner)) = tokio::join!(caller, owner) else {
            tracing::debug!("a forwarded upgrade did not complete");
            return;
        };
        let (mut caller, mut owner) = (TokioIo::new(caller), TokioIo::new(owner));
        if let Err(e) = tokio::io::copy_bidirectional(&mut caller, &mut owner).await {
            tracing::debug!(error = %e, "a forwarded upgraded connection ended with an error");
        }
    });
    Ok(Response::from_parts(parts, Body::empty()))
}

/// Headers without the hop-by-hop ones (and without Host and lengths, which
/// the next hop sets itself).
fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    for h in [
        header::CONNECTION,
        header::HOST,
        header::TRANSFER_ENCODING,
        header::CONTENT_LENGTH,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
    ] {
        out.remove(h);
    }
    out.remove("keep-alive");
    out.remove(crate::cluster::hop::HEADER);
    out
}
