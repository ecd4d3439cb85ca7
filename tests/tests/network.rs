//! Outbound network: a namespace the test makes plays "the internet"
//! (addresses in 198.18.0.0/15, an HTTP server); VMs with tap networking
//! reach it, and cannot reach the host, its services or other VMs; egress
//! policies `deny` and a CIDR list hold; a suspend and a wake keep it
//! working. Needs root (tap devices, nftables, namespaces), as CI has.

#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};

use hatch_e2e::*;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// A network namespace with a veth to the host and an HTTP server on two
/// addresses; removed on drop.
struct Internet {
    ns: String,
    server: Child,
    /// The host's end of the veth, and the namespace's two addresses.
    host: String,
    web: String,
    other: String,
    _root: tempfile::TempDir,
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Internet {
    fn start() -> Internet {
        // Distinct per test process (the pid) within 198.19.2-251.
        let tag: u32 = std::process::id() % 250 + 2;
        let ns = format!("hatch-inet-{}-{tag}", std::process::id());
        let (veth_host, veth_ns) = (format!("vih{tag}x"), format!("vin{tag}x"));
        let subnet = format!("198.19.{tag}");
        let (host, web, other) = (
            format!("{subnet}.1"),
            format!("{subnet}.2"),
            format!("{subnet}.3"),
        );
        run(&["ip", "netns", "add", &ns]);
        run(&[
            "ip", "link", "add", &veth_host, "type", "veth", "peer", "name", &veth_ns,
        ]);
        run(&["ip", "link", "set", &veth_ns, "netns", &ns]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{host}/24"),
            "dev",
            &veth_host,
        ]);
        run(&["ip", "link", "set", &veth_host, "up"]);
        for cmd in [
            vec!["ip", "link", "set", "lo", "up"],
            vec!["ip", "addr", "add", &format!("{web}/24"), "dev", &veth_ns],
            vec!["ip", "addr", "add", &format!("{other}/24"), "dev", &veth_ns],
            vec!["ip", "link", "set", &veth_ns, "up"],
        ] {
            let mut full = vec!["ip", "netns", "exec", &ns];
            full.extend(cmd);
            run(&full);
        }
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("hello"), "the internet says hi\n").unwrap();
        let server = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "/bin/busybox",
                "httpd",
                "-f",
                "-p",
                "80",
                "-h",
            ])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Internet {
            ns,
            server,
            host,
            web,
            other,
            _root: root,
        }
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        // The veth goes with the namespace.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// Deletes the daemon's nftables table when the test ends.
struct Firewall(String);

impl Drop for Firewall {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.0])
            .status();
    }
}

async fn exec(d: &Daemon, id: &str, cmd: &[&str]) -> Value {
    let (s, r) = d
        .call(
            Method::POST,
            &format!("/vms/{id}/exec"),
            Some(json!({ "cmd": cmd, "timeout_seconds": 60 })),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{cmd:?}: {r}");
    r
}

/// An HTTP GET from the VM (`http://HOST:PORT/PATH`, through busybox `nc`:
/// the static busybox's wget crashes on glibc's resolver): the body, or
/// None when no answer comes.
/// An HTTP GET from inside the VM that is expected to be refused: a
/// dropped connection fails after 3 s.
async fn fetch(d: &Daemon, id: &str, url: &str) -> Option<String> {
    fetch_within(d, id, url, 3).await
}

/// An HTTP GET from inside the VM that is expected to work: patient, as
/// a guest on a loaded machine (other tests' VMs share the 2 cores) can
/// take seconds for its first connection.
async fn fetch_ok(d: &Daemon, id: &str, url: &str) -> Option<String> {
    fetch_within(d, id, url, 30).await
}

async fn fetch_within(d: &Daemon, id: &str, url: &str, secs: u32) -> Option<String> {
    let rest = url.strip_prefix("http://").unwrap();
    let (host_port, path) = rest.split_once('/').unwrap();
    let (host, port) = host_port.split_once(':').unwrap_or((host_port, "80"));
    let script = format!("printf 'GET /{path} HTTP/1.0\\r\\n\\r\\n' | nc -w {secs} {host} {port}");
    let r = exec(d, id, &["sh", "-c", &script]).await;
    let out = r["stdout"].as_str().unwrap();
    match out.split_once("\r\n\r\n") {
        Some((_, body)) if r["exit_code"] == 0 => Some(body.to_string()),
        _ => None,
    }
}

async fn boot(d: &Daemon, name: &str, egress: Value) -> String {
    let mut body = json!({ "name": name });
    if !egress.is_null() {
        body["egress"] = egress;
    }
    let vm = d.create_vm(body).await;
    assert_eq!(vm["network"]["mode"], "tap", "{vm}");
    let id = vm["id"].as_str().unwrap().to_string();
    d.wait_state(&id, "running").await;
    d.create_route(&format!("{name}.localhost"), &id).await;
    d.wait_http(&format!("{name}.localhost"), "/").await;
    id
}

/// The VM's outbound address (the card that holds the default route).
async fn outbound_address(d: &Daemon, id: &str) -> (String, String) {
    let r = exec(d, id, &["ip", "route", "show", "default"]).await;
    let route = r["stdout"].as_str().unwrap().to_string();
    let mut words = route.split_whitespace();
    let gateway = words.nth(2).unwrap().to_string();
    let dev = route
        .split("dev ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let r = exec(d, id, &["ip", "-4", "-o", "addr", "show", "dev", &dev]).await;
    let addr = r["stdout"].as_str().unwrap().split("inet ").nth(1).unwrap();
    let addr = addr.split('/').next().unwrap().to_string();
    (addr, gateway)
}

#[tokio::test]
async fn vms_reach_the_internet_and_nothing_of_the_host_or_each_other() {
    let inet = Internet::start();
    let garage = Garage::start().await;
    let mut env = garage.env();
    env.push(("HATCH_NETWORK".into(), "tap".into()));
    let d = Daemon::start_with_env(env).await;
    let table = format!(
        "hatch_{}",
        &blake3::hash(d.data_dir.path().as_os_str().as_encoded_bytes()).to_hex()[..10]
    );
    let _firewall = Firewall(table);
    // A service of the host on every address (as an operator's might be),
    // answering HTTP; the host itself reaches it (the positive control).
    let host_service = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = host_service.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for conn in host_service.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.0 200 OK\r\n\r\nhost secret\n");
        }
    });
    let control = reqwest::get(format!("http://{}:{host_port}/", inet.host))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(control, "host secret\n");

    let open = boot(&d, "open", Value::Null).await;
    let closed = boot(&d, "closed", json!("deny")).await;
    let narrow = boot(&d, "narrow", json!([format!("{}/32", inet.web)])).await;
    let hello = format!("http://{}/hello", inet.web);

    // Out: allowed by default, also while another daemon with tap
    // networking shares the host (its table judges only its own taps).
    let other = Daemon::start_with_env(vec![("HATCH_NETWORK".into(), "tap".into())]).await;
    let _other_firewall = Firewall(format!(
        "hatch_{}",
        &blake3::hash(other.data_dir.path().as_os_str().as_encoded_bytes()).to_hex()[..10]
    ));
    assert_eq!(
        fetch_ok(&d, &open, &hello).await.as_deref(),
        Some("the internet says hi\n")
    );
    assert!(
        fetch_ok(&d, &open, &format!("http://{}/hello", inet.other))
            .await
            .is_some()
    );

    // Not the host: its addresses (the veth's, the tap's gateway), where
    // its services listen, nor the loopback-bound API, proxy and Garage.
    let (open_addr, gateway) = outbound_address(&d, &open).await;
    let (closed_addr, _) = outbound_address(&d, &closed).await;
    for target in [
        format!("{}:{host_port}", inet.host),
        format!("{gateway}:{host_port}"),
        format!("{gateway}:{}", d.api_addr.port()),
        format!("{gateway}:{}", d.proxy_addr.port()),
        format!("{}:{}", inet.host, d.api_addr.port()),
        "169.254.169.254:80".to_string(),
    ] {
        assert_eq!(
            fetch(&d, &open, &format!("http://{target}/")).await,
            None,
            "reached {target}"
        );
    }
    // Not another VM (its app listens on all its addresses).
    assert_ne!(open_addr, closed_addr);
    assert_eq!(
        fetch(&d, &open, &format!("http://{closed_addr}:8080/")).await,
        None,
        "reached another VM"
    );
    d.get_ok("closed.localhost", "/").await; // while the proxy does

    // Egress policies.
    assert_eq!(fetch(&d, &closed, &hello).await, None, "deny");
    assert!(fetch_ok(&d, &narrow, &hello).await.is_some(), "listed");
    assert_eq!(
        fetch(&d, &narrow, &format!("http://{}/hello", inet.other)).await,
        None,
        "not listed"
    );

    // Suspended and woken: a wake keeps the VM's /30 while it is free, and
    // the guest, which holds that address since its snapshot, is left as
    // it is (no re-addressing), and new connections out work. The guest
    // also keeps its neighbour entry for the gateway (fresh here, from a
    // connection just before the suspend), which the kernel trusts without
    // asking again: the new tap must answer to the MAC it names.
    assert!(fetch_ok(&d, &open, &hello).await.is_some());
    let gateway_mac = guest_neighbour(&d, &open, &gateway).await;
    assert_eq!(gateway_mac, host_mac_of(&gateway), "the guest's entry");
    let readdressed_before = readdressed(&d).await;
    let sid = d.snapshot(&open, true).await;
    d.wait_snapshot(&open, &sid, "ready").await;
    d.wait_state(&open, "snapshotted").await;
    d.get_ok("open.localhost", "/counter").await;
    assert_eq!(readdressed(&d).await, readdressed_before, "kept address");
    assert_eq!(host_mac_of(&gateway), gateway_mac, "the new tap's MAC");
    assert_eq!(
        outbound_address(&d, &open).await,
        (open_addr.clone(), gateway.clone())
    );
    assert_eq!(
        fetch_ok(&d, &open, &hello).await.as_deref(),
        Some("the internet says hi\n"),
        "after a wake onto the same address"
    );

    // Here another interface takes the /30 meanwhile, so the VM gets a new
    // one and the agent re-addresses it.
    let counter = d.get_ok("open.localhost", "/counter").await;
    let sid = d.snapshot(&open, true).await;
    d.wait_snapshot(&open, &sid, "ready").await;
    d.wait_state(&open, "snapshotted").await;
    let _squatter = Squatter::take(&gateway);
    let woken = d.get_ok("open.localhost", "/counter").await;
    assert_eq!(
        kv(&woken, "counter").parse::<u64>().unwrap(),
        kv(&counter, "counter").parse::<u64>().unwrap() + 1
    );
    assert_eq!(
        fetch_ok(&d, &open, &hello).await.as_deref(),
        Some("the internet says hi\n"),
        "after the wake"
    );
    assert_eq!(readdressed(&d).await, readdressed_before + 1, "new address");
    let (new_addr, new_gateway) = outbound_address(&d, &open).await;
    assert_ne!(
        (new_addr, new_gateway),
        (open_addr, gateway),
        "re-addressed"
    );
}

/// How many restores had the guest agent re-address the outbound card.
async fn readdressed(d: &Daemon) -> u64 {
    let text = d.metrics_text().await;
    text.lines()
        .find_map(|l| l.strip_prefix("hatch_guest_readdressed_total "))
        .expect("hatch_guest_readdressed_total in /metrics")
        .trim()
        .parse()
        .unwrap()
}

/// The MAC the guest's neighbour table holds for `addr`.
async fn guest_neighbour(d: &Daemon, id: &str, addr: &str) -> String {
    let r = exec(d, id, &["cat", "/proc/net/arp"]).await;
    let table = r["stdout"].as_str().unwrap();
    let row = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(addr))
        .unwrap_or_else(|| panic!("no neighbour entry for {addr}:\n{table}"));
    row.split_whitespace().nth(3).unwrap().to_string()
}

/// The MAC of the host interface that holds `addr`.
fn host_mac_of(addr: &str) -> String {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show", "to", &format!("{addr}/32")])
        .output()
        .unwrap();
    let shown = String::from_utf8(out.stdout).unwrap();
    let dev = shown
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no interface holds {addr}"));
    std::fs::read_to_string(format!("/sys/class/net/{dev}/address"))
        .unwrap()
        .trim()
        .to_string()
}

/// A tap holding an address (so that no VM's link can take it).
struct Squatter(&'static str);

impl Squatter {
    fn take(addr: &str) -> Squatter {
        let name = "hvsquatter0";
        let run = |args: &[&str]| {
            let ok = Command::new("ip").args(args).status().unwrap().success();
            assert!(ok, "ip {args:?}");
        };
        run(&["tuntap", "add", "dev", name, "mode", "tap"]);
        run(&["addr", "add", &format!("{addr}/30"), "dev", name]);
        Squatter(name)
    }
}

impl Drop for Squatter {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["tuntap", "del", "dev", self.0, "mode", "tap"])
            .status();
    }
}
