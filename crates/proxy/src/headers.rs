//! Header handling: route host extraction, hop-by-hop stripping, X-Forwarded-*.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;

use crate::error::ProxyError;

pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Hop-by-hop headers (RFC 9110 section 7.6.1 plus the common non-standard ones).
/// Any `Proxy-*` header is removed as well, see [`strip_hop_by_hop`].
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The host a request is addressed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TargetHost {
    /// Normalized route key handed to the resolver.
    pub(crate) route: String,
    /// The original `Host` value (with port), for `Host` / `X-Forwarded-Host`.
    pub(crate) original: HeaderValue,
    /// Whether it came from an absolute-form request target.
    pub(crate) from_uri: bool,
}

/// Finds the target host: the URI authority for absolute-form requests
/// (RFC 9112 section 3.2.2), otherwise the single `Host` header.
pub(crate) fn target_host(parts: &Parts) -> Result<TargetHost, ProxyError> {
    if let Some(authority) = parts.uri.authority() {
        let original =
            HeaderValue::from_str(authority.as_str()).map_err(|_| ProxyError::InvalidHost)?;
        let route = normalize_host(authority.as_str()).ok_or(ProxyError::InvalidHost)?;
        return Ok(TargetHost {
            route,
            original,
            from_uri: true,
        });
    }
    let mut values = parts.headers.get_all(header::HOST).iter();
    let original = values.next().ok_or(ProxyError::MissingHost)?;
    if values.next().is_some() {
        return Err(ProxyError::InvalidHost);
    }
    let text = original.to_str().map_err(|_| ProxyError::InvalidHost)?;
    if text.trim().is_empty() {
        return Err(ProxyError::MissingHost);
    }
    let route = normalize_host(text).ok_or(ProxyError::InvalidHost)?;
    Ok(TargetHost {
        route,
        original: original.clone(),
        from_uri: false,
    })
}

/// Lower-cases a `host[:port]` value and drops the port and a trailing dot.
/// IPv6 literals lose their brackets. Returns `None` for malformed values.
pub(crate) fn normalize_host(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let host = if let Some(rest) = raw.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || is_port_suffix(after)) {
            return None;
        }
        inside
    } else {
        match raw.split_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            Some(_) => return None,
            None => raw,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'));
    valid.then(|| host.to_ascii_lowercase())
}

/// `":"` followed by zero or more digits (an empty port is allowed by RFC 3986).
fn is_port_suffix(s: &str) -> bool {
    s.strip_prefix(':')
        .is_some_and(|port| port.bytes().all(|b| b.is_ascii_digit()))
}

/// The lower-cased tokens of all `Connection` headers.
fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Whether a request asks for a protocol upgrade (`Connection: upgrade` plus an
/// `Upgrade` header).
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && connection_tokens(headers).iter().any(|t| t == "upgrade")
}

/// Removes hop-by-hop headers: those named in `Connection`, the fixed list, and
/// every `Proxy-*` header. With `keep_upgrade`, the `Upgrade` header survives and
/// `Connection: upgrade` is set, so the upgrade handshake reaches the other side.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let upgrade: Vec<HeaderValue> = if keep_upgrade {
        headers.get_all(header::UPGRADE).iter().cloned().collect()
    } else {
        Vec::new()
    };
    for token in connection_tokens(headers) {
        if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    let proxy_headers: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy_headers {
        headers.remove(name);
    }
    if keep_upgrade && !upgrade.is_empty() {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        for value in upgrade {
            headers.append(header::UPGRADE, value);
        }
    }
}

/// Sets `X-Forwarded-For` (appending the peer to any existing list),
/// `X-Forwarded-Proto: http` and `X-Forwarded-Host`.
pub(crate) fn set_forwarded(headers: &mut HeaderMap, peer: IpAddr, original_host: HeaderValue) {
    let peer = peer.to_canonical().to_string();
    let mut list: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    list.push(&peer);
    let value = HeaderValue::from_str(&list.join(", "))
        .or_else(|_| HeaderValue::from_str(&peer))
        .ok();
    headers.remove(&X_FORWARDED_FOR);
    if let Some(value) = value {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    headers.insert(X_FORWARDED_HOST.clone(), original_host);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(uri: &str, host: Option<&str>) -> Parts {
        let mut builder = Request::builder().uri(uri);
        if let Some(host) = host {
            builder = builder.header(header::HOST, host);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn normalizes_hosts() {
        assert_eq!(
            normalize_host("App.Example.COM:8080").as_deref(),
            Some("app.example.com")
        );
        assert_eq!(
            normalize_host("app.example.com.").as_deref(),
            Some("app.example.com")
        );
        assert_eq!(normalize_host("app:").as_deref(), Some("app"));
        assert_eq!(normalize_host("[::1]:80").as_deref(), Some("::1"));
        assert_eq!(normalize_host("[::1]").as_deref(), Some("::1"));
        assert_eq!(normalize_host("a:b:c"), None);
        assert_eq!(normalize_host("a:80x"), None);
        assert_eq!(normalize_host("bad host"), None);
        assert_eq!(normalize_host(""), None);
        assert_eq!(normalize_host(":80"), None);
    }

    #[test]
    fn target_from_header_or_uri() {
        let t = target_host(&parts("/x", Some("Foo.Test:9"))).unwrap();
        assert_eq!(t.route, "foo.test");
        assert_eq!(t.original, "Foo.Test:9");
        assert!(!t.from_uri);

        let t = target_host(&parts("http://Abs.Test:81/x?q", Some("other.test"))).unwrap();
        assert_eq!(t.route, "abs.test");
        assert_eq!(t.original, "Abs.Test:81");
        assert!(t.from_uri);

        assert!(matches!(
            target_host(&parts("/x", None)),
            Err(ProxyError::MissingHost)
        ));
        assert!(matches!(
            target_host(&parts("/x", Some(""))),
            Err(ProxyError::MissingHost)
        ));
    }

    #[test]
    fn duplicate_host_is_rejected() {
        let mut p = parts("/x", Some("a.test"));
        p.headers
            .append(header::HOST, HeaderValue::from_static("b.test"));
        assert!(matches!(target_host(&p), Err(ProxyError::InvalidHost)));
    }

    #[test]
    fn strips_hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Custom, Upgrade"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-custom", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::TRAILER, HeaderValue::from_static("x"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("secret"),
        );
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("proxy-foo", HeaderValue::from_static("1"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        h.insert("x-kept", HeaderValue::from_static("yes"));

        let mut upgrade = h.clone();
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(h.contains_key(header::CONTENT_LENGTH) && h.contains_key("x-kept"));

        assert!(is_upgrade_request(&upgrade));
        strip_hop_by_hop(&mut upgrade, true);
        assert_eq!(upgrade[header::CONNECTION], "upgrade");
        assert_eq!(upgrade[header::UPGRADE], "websocket");
        assert!(!upgrade.contains_key("x-custom"));
        assert!(!upgrade.contains_key(header::PROXY_AUTHORIZATION));
    }

    #[test]
    fn upgrade_needs_connection_token() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!is_upgrade_request(&h));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, UPGRADE"),
        );
        assert!(is_upgrade_request(&h));
    }

    #[test]
    fn forwarded_headers_append() {
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        h.append(
            &X_FORWARDED_FOR,
            HeaderValue::from_static("2.2.2.2, 3.3.3.3"),
        );
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        let peer: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        set_forwarded(&mut h, peer, HeaderValue::from_static("App.Test:8080"));
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[&X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_FORWARDED_HOST], "App.Test:8080");
    }
}
