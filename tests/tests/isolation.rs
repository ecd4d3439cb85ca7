//! A guest must not reach the host's loopback services (the Hatch API and
//! proxy, S3, anything on 127.0.0.1) through its network.
//!
//! The guest agent probes addresses named on its kernel command line and prints
//! the outcome on the console; the probe VM runs a user-registered image (the
//! default image's files with that command line), which also exercises image
//! registration end to end.

#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use hatch_e2e::{Daemon, PATIENCE, hatch_bin, images_dir};
use serde_json::{Value, json};

#[tokio::test]
async fn guest_cannot_reach_host_loopback_services() {
    let d = Daemon::start().await;
    // Another host service on loopback, as S3 or a database would be.
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    other.set_nonblocking(true).unwrap();
    let other_port = other.local_addr().unwrap().port();

    // Register the probe image: the default image's kernel, initrd and disk.
    let default: Value =
        serde_json::from_slice(&std::fs::read(images_dir().join("default/image.json")).unwrap())
            .unwrap();
    let targets = format!(
        "10.0.2.2:{},10.0.2.2:{},10.0.2.2:{other_port},10.0.2.15:8080",
        d.api_addr.port(),
        d.proxy_addr.port()
    );
    let name = format!("probe-{}", std::process::id());
    let out = Command::new(hatch_bin())
        .args(["image", "register", &name, "--images-dir"])
        .arg(images_dir())
        .arg("--kernel")
        .arg(default["kernel"].as_str().unwrap())
        .arg("--initrd")
        .arg(default["initrd"].as_str().unwrap())
        .arg("--disk")
        .arg(default["disk"].as_str().unwrap())
        .arg("--cmdline")
        .arg(format!(
            "{} hatch.netprobe={targets}",
            default["cmdline"].as_str().unwrap()
        ))
        .output()
        .unwrap();
    let image_dir = images_dir().join(&name);
    let _cleanup = RemoveOnDrop(image_dir.clone());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let vm = d
        .create_vm(json!({ "image": name, "memory_mib": 128 }))
        .await;
    let id = vm["id"].as_str().unwrap();
    d.wait_state(id, "running").await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let console = loop {
        let console = d.console(id);
        if console.contains("hatch-netprobe done") {
            break console;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no probe results:\n{console}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let outcome = |addr: &str| {
        console
            .lines()
            .find_map(|l| l.strip_prefix(&format!("hatch-netprobe {addr} ")))
            .unwrap_or_else(|| panic!("no result for {addr}:\n{console}"))
            .to_string()
    };
    // The positive control: the probe can connect where a service is reachable.
    assert_eq!(outcome("10.0.2.15:8080"), "connected", "{console}");
    // QEMU's restricted user network answers connections to the host side
    // with a reset: "refused" shows the packets did reach QEMU's network (so
    // guest networking works) and were turned away. An unrestricted network
    // gives "connected" here, a broken one an error or a timeout.
    for port in [d.api_addr.port(), d.proxy_addr.port(), other_port] {
        let got = outcome(&format!("10.0.2.2:{port}"));
        assert_eq!(got, "refused", "guest probing host port {port}:\n{console}");
    }
    // And nothing arrived at the host-side listener.
    assert!(
        other.accept().is_err(),
        "the guest connected to a host loopback service"
    );
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
