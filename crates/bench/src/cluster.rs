//! `hatch-bench cluster`: two nodes sharing PostgreSQL and S3 (started by
//! `scripts/bench.sh cluster`). Measured in one run, side by side:
//!
//! - a wake on the node that holds the local copy (suspend, then a request
//!   through that node's proxy) against a wake on the other node from S3
//!   alone (suspend, hand the VM over with `move {start: false}`, then a
//!   request through the other node's proxy), to the first proxied answer;
//! - the latency of requests forwarded between nodes against requests served
//!   by the node that runs the VM.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use crate::api::Api;
use crate::stats::Samples;

#[derive(clap::Args)]
pub struct ClusterArgs {
    #[command(flatten)]
    common: crate::Args,
    /// The second node's API.
    #[arg(long, default_value = "http://127.0.0.1:27070")]
    api2: String,
    /// The second node's proxy.
    #[arg(long, default_value = "127.0.0.1:28080")]
    proxy2: String,
    #[arg(long, default_value = "n1")]
    node1: String,
    #[arg(long, default_value = "n2")]
    node2: String,
    /// Sequential requests per latency series.
    #[arg(long, default_value_t = 300)]
    requests: usize,
}

pub async fn run(args: ClusterArgs) -> anyhow::Result<()> {
    let c = &args.common;
    let nodes = [
        (Api::new(&c.api, &c.api_key, &c.proxy), args.node1.as_str()),
        (
            Api::new(&args.api2, &c.api_key, &args.proxy2),
            args.node2.as_str(),
        ),
    ];
    let n = c.runs;
    println!(
        "hatch-bench cluster: {} MiB guest, {} MiB touched, {n} runs each, 2 nodes",
        c.memory_mib, c.touch_mib
    );
    let (first, _) = &nodes[0];
    let vm = first
        .create_vm(json!({ "image": c.image, "memory_mib": c.memory_mib }))
        .await?;
    let host = "cluster.bench.localhost";
    first.route(host, &vm).await?;
    first.wait_http(host).await?;
    first.wait_console(&vm, "hatch-guest: touched").await?;

    // Request latency: served by the node that runs the VM, and forwarded
    // by the other one; interleaved blocks so that both see the same load.
    let mut local = Samples::default();
    let mut forwarded = Samples::default();
    for _ in 0..args.requests / 50 {
        for _ in 0..50 {
            local.push(timed_get(&nodes[0].0, host).await?);
        }
        for _ in 0..50 {
            forwarded.push(timed_get(&nodes[1].0, host).await?);
        }
    }

    // Wakes: on the node with the local copy, then on the other from S3;
    // the VM ends each run on the other node, which starts the next.
    let mut wake_local = Samples::default();
    let mut wake_s3 = Samples::default();
    let mut here = 0;
    for _ in 0..n {
        let (api, _) = &nodes[here];
        let (other, other_name) = &nodes[1 - here];
        suspend(api, &vm).await?;
        let t0 = Instant::now();
        expect_ok(api.proxy_get(host, "/").await?)?;
        wake_local.push(t0.elapsed());

        suspend(api, &vm).await?;
        api.call_json(
            reqwest::Method::POST,
            &format!("/vms/{vm}/move"),
            json!({ "to": other_name, "start": false }),
        )
        .await?;
        let t0 = Instant::now();
        expect_ok(other.proxy_get(host, "/").await?)?;
        wake_s3.push(t0.elapsed());
        here = 1 - here;
    }
    nodes[here].0.delete_vm(&vm).await?;

    println!();
    println!("| measurement | min | median | max |");
    println!("|---|---|---|---|");
    wake_local.row("wake on the node with the local copy, to first proxied answer");
    wake_s3.row("wake on the other node from S3 alone, to first proxied answer");
    local.row("request served by the VM's node (proxy to VM)");
    forwarded.row("request forwarded from the other node");
    println!();
    println!(
        "wake from S3 on another node / local wake: {:.2}x; forwarding adds {:.2} ms at the median",
        wake_s3.median() / wake_local.median(),
        forwarded.median() - local.median()
    );
    Ok(())
}

async fn timed_get(api: &Api, host: &str) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    expect_ok(api.proxy_get(host, "/").await?)?;
    Ok(t0.elapsed())
}

fn expect_ok(status: u16) -> anyhow::Result<()> {
    if status != 200 {
        bail!("proxied request answered {status}");
    }
    Ok(())
}

/// Suspend through `api` and wait until the snapshot is in S3.
async fn suspend(api: &Api, vm: &str) -> anyhow::Result<()> {
    let sid = api.snapshot(vm, true).await.context("suspending")?;
    api.wait_snapshot(vm, &sid).await?;
    api.wait_state(vm, "snapshotted").await?;
    Ok(())
}
