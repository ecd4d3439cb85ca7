//! `GET /ws`: a WebSocket handshake, then an echo of every byte received.
//! Enough to hold a long-lived upgraded connection open through the proxy
//! (idle detection must count it); frames are echoed as they are, unparsed.

use std::io::{self, Read, Write};

use base64::Engine;
use tiny_http::{Header, Request, Response, StatusCode};

/// RFC 6455: the server proves it read the key by hashing it with this GUID.
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(client_key: &str) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(client_key.trim().as_bytes());
    sha.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes())
}

fn header<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}

/// Answer 101 and echo on a thread of its own (workers stay free), or 400
/// when the request is not a WebSocket upgrade.
pub fn upgrade(req: Request) {
    let is_ws = header(&req, "Upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = header(&req, "Sec-WebSocket-Key").filter(|_| is_ws) else {
        let _ = req
            .respond(Response::from_string("websocket_upgrade_required\n").with_status_code(400));
        return;
    };
    let accept = accept_key(key);
    let mut resp = Response::empty(StatusCode(101));
    for (k, v) in [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept.as_str()),
    ] {
        if let Ok(h) = Header::from_bytes(k.as_bytes(), v.as_bytes()) {
            resp.add_header(h);
        }
    }
    let stream = req.upgrade("websocket", resp);
    let spawned = std::thread::Builder::new()
        .name("ws-echo".into())
        .spawn(move || {
            let mut stream = stream;
            if let Err(e) = echo(&mut stream) {
                eprintln!("hatch-guest: websocket: {e}");
            }
        });
    if let Err(e) = spawned {
        eprintln!("hatch-guest: cannot spawn websocket thread: {e}");
    }
}

fn echo(stream: &mut (impl Read + Write + ?Sized)) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
        stream.flush()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_the_rfc_example() {
        // RFC 6455, section 1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
