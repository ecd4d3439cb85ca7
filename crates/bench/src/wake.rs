//! `hatch-bench wake`: the latency of the first proxied response after an
//! idle suspend (local cache, then S3 only), and the proxy's throughput to a
//! running VM next to a direct connection to the VM's forwarded port.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use crate::api::Api;
use crate::stats::Samples;

#[derive(clap::Args)]
pub struct WakeArgs {
    #[command(flatten)]
    common: crate::Args,
    /// The route's idle timeout (seconds).
    #[arg(long, default_value_t = 2)]
    idle_timeout: u64,
    /// Requests per throughput run.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Concurrent connections in a throughput run.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

pub async fn run(args: WakeArgs) -> anyhow::Result<()> {
    let c = &args.common;
    let api = Api::new(&c.api, &c.api_key, &c.proxy);
    let n = c.runs;
    println!(
        "hatch-bench wake: {} MiB guest, {} MiB touched, idle timeout {} s, {n} runs each",
        c.memory_mib, c.touch_mib, args.idle_timeout
    );
    let vm = api
        .create_vm(json!({ "image": c.image, "memory_mib": c.memory_mib }))
        .await?;
    let host = "wake.bench.localhost";
    api.call_json(
        reqwest::Method::POST,
        "/routes",
        json!({ "hostname": host, "vm_id": vm, "idle_timeout_seconds": args.idle_timeout }),
    )
    .await?;
    api.wait_http(host).await?;
    // An open WebSocket through the proxy keeps the VM awake until the
    // throughput runs are done: first while the guest touches its working
    // set (longer than the idle timeout under TCG), then because direct
    // requests bypass the proxy, so nothing would count them as activity.
    let keep_awake = open_websocket(&c.proxy, host).await?;
    api.wait_console(&vm, "hatch-guest: touched").await?;

    // Throughput while it runs, alternating direct and proxied runs.
    let direct_port = api.guest_port(&vm, 8080).await?;
    let direct_url = format!("http://127.0.0.1:{direct_port}/");
    let proxy_url = format!("http://{}/", c.proxy);
    let mut direct = Samples::default();
    let mut proxied = Samples::default();
    for _ in 0..n {
        direct.push_value(throughput(&direct_url, None, args.requests, args.concurrency).await?);
        proxied
            .push_value(throughput(&proxy_url, Some(host), args.requests, args.concurrency).await?);
    }

    drop(keep_awake);

    // Wake after an idle suspend, from the local cache and from S3 only.
    let mut local = Samples::default();
    let mut s3 = Samples::default();
    let standby_before = api.metric("hatch_standby_wakes_total").await?;
    for from_s3 in [false, true] {
        for _ in 0..n {
            api.wait_state(&vm, "snapshotted").await?;
            let snap = api.newest_snapshot(&vm).await?;
            if snap["trigger"] != "idle" {
                bail!("expected an idle suspend, got {snap}");
            }
            let sid = snap["id"].as_str().context("snapshot id")?;
            api.wait_snapshot(&vm, sid).await?;
            if from_s3 {
                crate::wipe_local(&c.data_dir, &vm)?;
            } else {
                api.await_standby(crate::STANDBY_WAIT).await?;
            }
            let t0 = Instant::now();
            let status = api.proxy_get(host, "/").await?;
            if status != 200 {
                bail!("wake answered {status}");
            }
            if from_s3 { &mut s3 } else { &mut local }.push(t0.elapsed());
        }
    }
    let standby_wakes = api.metric("hatch_standby_wakes_total").await? - standby_before;
    api.delete_vm(&vm).await?;

    println!();
    println!("| measurement | min | median | max |");
    println!("|---|---|---|---|");
    local.row("first response after idle suspend, local cache");
    s3.row("first response after idle suspend, S3 only");
    direct.row_value(&format!(
        "direct to the VM's port, requests/s ({} x {})",
        args.requests, args.concurrency
    ));
    proxied.row_value("through the proxy, requests/s");
    println!();
    println!(
        "proxy / direct throughput (median): {:.2}x",
        proxied.median() / direct.median()
    );
    println!(
        "local-cache wakes into a standby QEMU: {standby_wakes} of {}",
        local.len()
    );
    Ok(())
}

/// A WebSocket to the guest's `/ws` through the proxy, open until dropped.
async fn open_websocket(proxy: &str, host: &str) -> anyhow::Result<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy).await?;
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: aGF0Y2gtYmVuY2gta2V5MQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        if s.read(&mut b).await? == 0 {
            bail!("WebSocket closed during the handshake");
        }
        head.push(b[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        bail!("no WebSocket: {}", String::from_utf8_lossy(&head));
    }
    Ok(s)
}

/// Requests per second for `total` GETs of `url` over `concurrency`
/// keep-alive connections, each answered 200.
async fn throughput(
    url: &str,
    host: Option<&str>,
    total: usize,
    concurrency: usize,
) -> anyhow::Result<f64> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let left = Arc::new(AtomicUsize::new(total));
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (http, left, url) = (http.clone(), left.clone(), url.to_string());
        let host = host.map(str::to_string);
        set.spawn(async move {
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                let mut req = http.get(&url).timeout(Duration::from_secs(30));
                if let Some(h) = &host {
                    req = req.header("host", h);
                }
                let resp = req.send().await?;
                let status = resp.status();
                resp.bytes().await?;
                if !status.is_success() {
                    bail!("{url} answered {status}");
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(total as f64 / t0.elapsed().as_secs_f64())
}
