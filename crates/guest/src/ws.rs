//! `GET /ws`: a WebSocket that echoes every text and binary message. It
//! holds a long-lived upgraded connection open through the proxy (idle
//! detection must count it). Frames are parsed and written by `tungstenite`:
//! clients mask their frames and servers must not (RFC 6455 5.1), so
//! echoing the client's bytes as they came would be refused by real clients.

use std::io::{Read, Write};

use base64::Engine;
use tiny_http::{Header, Request, Response, StatusCode};
use tungstenite::protocol::Role;
use tungstenite::{Message, WebSocket};

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
            if let Err(e) = echo(WebSocket::from_raw_socket(stream, Role::Server, None)) {
                eprintln!("hatch-guest: websocket: {e}");
            }
        });
    if let Err(e) = spawned {
        eprintln!("hatch-guest: cannot spawn websocket thread: {e}");
    }
}

/// Echo text and binary messages until the client closes. Pings are
/// answered and a close is returned by tungstenite itself.
fn echo<S: Read + Write>(mut ws: WebSocket<S>) -> Result<(), Box<tungstenite::Error>> {
    loop {
        match ws.read() {
            Ok(msg @ (Message::Text(_) | Message::Binary(_))) => ws.send(msg)?,
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return Ok(());
            }
            Err(e) => return Err(Box::new(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame (masked, as clients must send) comes back as a server
    /// frame: unmasked, same payload.
    #[test]
    fn echoes_messages_unmasked() {
        let mut client = WebSocket::from_raw_socket(Pipe::default(), Role::Client, None);
        client.send(Message::text("hello")).unwrap();
        let sent = std::mem::take(&mut client.get_mut().out);
        assert_ne!(sent[1] & 0x80, 0, "clients mask");
        let server_side = Pipe {
            input: std::io::Cursor::new(sent),
            out: Vec::new(),
        };
        let mut server = WebSocket::from_raw_socket(server_side, Role::Server, None);
        let msg = server.read().unwrap();
        server.send(msg).unwrap();
        let echoed = server.get_ref().out.clone();
        assert_eq!(echoed[1] & 0x80, 0, "servers must not mask");
        assert_eq!(&echoed[2..], b"hello");
    }

    #[derive(Default)]
    struct Pipe {
        input: std::io::Cursor<Vec<u8>>,
        out: Vec<u8>,
    }

    impl Read for Pipe {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.out.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn accept_key_matches_the_rfc_example() {
        // RFC 6455, section 1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
