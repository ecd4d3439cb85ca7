//! `hatch-bench`, run through `scripts/bench.sh`, which starts Garage and a
//! daemon for it. For a 1 GiB VM with 400 MiB touched (defaults):
//!
//! - `snapshot`: measures, in one run and side by side: cold boot; a fork
//!   of a checkpoint to its first answer; pause for
//!   a checkpoint and for a suspend; restore to the first proxied HTTP answer
//!   from the local cache and from S3 only; bytes stored by a first and a
//!   second (idle) snapshot; and the baseline a user would script by hand:
//!   QEMU `migrate` to a file, then `-incoming` from it.
//! - `wake`: the first proxied answer after an idle suspend (local cache and
//!   S3 only), and proxy throughput next to a direct connection to the VM.
//! - `cluster`: two nodes; a wake on the node with the local copy vs one on
//!   the other node from S3, and forwarded vs local request latency.
//! - `herd`: eight suspended 256 MiB VMs woken by one request each at the
//!   same moment, next to a single wake, each guest's clock checked.

mod api;
mod baseline;
mod cluster;
mod herd;
mod hostcpu;
mod image;
mod stats;
mod wake;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use serde_json::json;

use api::Api;
use stats::Samples;

/// How long a benchmark waits for the standby QEMU of a suspended VM
/// before it wakes it anyway (then the wake starts its own QEMU).
pub const STANDBY_WAIT: Duration = Duration::from_secs(3);

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(clap::Subcommand)]
enum Bench {
    /// Snapshot pauses, restores and storage, next to the QEMU baseline.
    Snapshot(Args),
    /// Wake latency through the proxy after idle suspends, and throughput.
    Wake(wake::WakeArgs),
    /// Two nodes: wake with the local copy vs on another node from S3, and
    /// forwarded vs local request latency.
    Cluster(cluster::ClusterArgs),
    /// A container image: import time, boot and wake, next to the default
    /// image's.
    Image(image::ImageArgs),
    /// Suspended VMs woken by one request each at the same moment, next to
    /// a single wake; every guest's clock checked.
    Herd(herd::HerdArgs),
}

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, env = "HATCH_API", default_value = "http://127.0.0.1:17070")]
    api: String,
    #[arg(long, env = "HATCH_API_KEY")]
    api_key: String,
    /// The daemon's proxy address.
    #[arg(long, default_value = "127.0.0.1:18080")]
    proxy: String,
    /// The daemon's data dir (to empty the local snapshot cache).
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long)]
    images_dir: PathBuf,
    /// Image whose command line touches memory (`hatch.touch_mib=`).
    #[arg(long, default_value = "bench-touch")]
    image: String,
    #[arg(long, default_value_t = 1024)]
    memory_mib: u64,
    #[arg(long, default_value_t = 400)]
    touch_mib: u64,
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().bench {
        Bench::Snapshot(args) => snapshot(args).await,
        Bench::Wake(args) => wake::run(args).await,
        Bench::Cluster(args) => cluster::run(args).await,
        Bench::Image(args) => image::run(args).await,
        Bench::Herd(args) => herd::run(args).await,
    }
}

async fn snapshot(args: Args) -> anyhow::Result<()> {
    let api = Api::new(&args.api, &args.api_key, &args.proxy);
    let n = args.runs;
    println!(
        "hatch-bench: {} MiB guest, {} MiB touched, {n} runs each, accel {}",
        args.memory_mib,
        args.touch_mib,
        hatch_vmm::AccelChoice::Auto.resolve()
    );

    // Cold boot to the first proxied answer.
    let mut boot = Samples::default();
    for i in 0..n {
        let t0 = Instant::now();
        let vm = api
            .create_vm(json!({ "memory_mib": args.memory_mib }))
            .await?;
        let host = format!("boot-{i}.bench.localhost");
        api.route(&host, &vm).await?;
        // One request sent at once, as a user would (held until the app
        // answers); polling only if it is refused.
        if api.proxy_get(&host, "/").await? != 200 {
            api.wait_http(&host).await?;
        }
        boot.push(t0.elapsed());
        api.delete_vm(&vm).await?;
    }

    // The VM under test: a working set of touch_mib.
    let vm = api
        .create_vm(json!({ "image": args.image, "memory_mib": args.memory_mib }))
        .await?;
    let host = "app.bench.localhost";
    api.route(host, &vm).await?;
    api.wait_http(host).await?;
    api.wait_console(&vm, "hatch-guest: touched").await?;

    // Checkpoints: pause, and what the first and an idle second one store.
    let mut checkpoint_pause = Samples::default();
    let mut stored = Vec::new();
    let mut upload_mbps = Samples::default();
    for _ in 0..n.max(2) {
        let t0 = Instant::now();
        let snap = api.snapshot(&vm, false).await?;
        let snap = api.wait_snapshot(&vm, &snap).await?;
        let pause = Duration::from_millis(snap["pause_ms"].as_u64().unwrap_or(0));
        checkpoint_pause.push(pause);
        let bytes = snap["stored_bytes"].as_u64().unwrap_or(0);
        stored.push(bytes);
        let upload = t0.elapsed().saturating_sub(pause).as_secs_f64();
        if bytes > 10 << 20 {
            upload_mbps.push_value(bytes as f64 / 1e6 / upload);
        }
    }

    // Forks of the last checkpoint: a new VM resuming its memory and disk.
    let checkpoint = api.newest_snapshot(&vm).await?;
    let checkpoint = checkpoint["id"].as_str().unwrap_or_default().to_string();
    let mut fork = Samples::default();
    for i in 0..n {
        let t0 = Instant::now();
        let f = api
            .create_vm(json!({ "from_snapshot": checkpoint }))
            .await?;
        let host = format!("fork-{i}.bench.localhost");
        api.route(&host, &f).await?;
        if api.proxy_get(&host, "/").await? != 200 {
            api.wait_http(&host).await?;
        }
        fork.push(t0.elapsed());
        api.delete_vm(&f).await?;
    }

    // Suspend and wake from the local cache.
    let mut suspend_pause = Samples::default();
    let mut restore_local = Samples::default();
    for _ in 0..n {
        let snap = api.snapshot(&vm, true).await?;
        let snap = api.wait_snapshot(&vm, &snap).await?;
        api.wait_state(&vm, "snapshotted").await?;
        suspend_pause.push(Duration::from_millis(
            snap["pause_ms"].as_u64().unwrap_or(0),
        ));
        api.await_standby(STANDBY_WAIT).await?;
        let t0 = Instant::now();
        api.restore(&vm).await?;
        api.wait_http(host).await?;
        restore_local.push(t0.elapsed());
    }

    // Suspend and wake from S3 only. From the second round on, each
    // suspend comes right after a wake from S3, its memory still arriving.
    let mut restore_s3 = Samples::default();
    let mut download_mbps = Samples::default();
    let mut lazy_suspend_pause = Samples::default();
    let mut lazy_suspend_total = Samples::default();
    let mut lazy_cycle_stored = Samples::default();
    for round in 0..=n {
        let t_suspend = Instant::now();
        let snap = api.snapshot(&vm, true).await?;
        api.wait_state(&vm, "snapshotted").await?;
        let suspended = t_suspend.elapsed();
        let snap = api.wait_snapshot(&vm, &snap).await?;
        if round > 0 {
            lazy_suspend_total.push(suspended);
            lazy_suspend_pause.push(Duration::from_millis(
                snap["pause_ms"].as_u64().unwrap_or(0),
            ));
            lazy_cycle_stored
                .push_value(snap["stored_bytes"].as_u64().unwrap_or(0) as f64 / 1024.0);
        }
        if round == n {
            break;
        }
        wipe_local(&args.data_dir, &vm)?;
        let t0 = Instant::now();
        api.restore(&vm).await?;
        api.wait_http(host).await?;
        restore_s3.push(t0.elapsed());
        let data = snap["memory_bytes"]
            .as_u64()
            .unwrap_or(0)
            .min(args.touch_mib << 20);
        download_mbps.push_value(data as f64 / 1e6 / t0.elapsed().as_secs_f64());
    }
    api.delete_vm(&vm).await?;

    // The baseline, in the same run, with the same image and size.
    let base = baseline::run(&args.images_dir, &args.image, args.memory_mib, n).await?;

    println!();
    println!("| measurement | min | median | max |");
    println!("|---|---|---|---|");
    boot.row("cold boot: create until a request sent at once is answered");
    fork.row("fork (`from_snapshot`, local copy) to first HTTP response");
    checkpoint_pause.row("checkpoint pause (`stop: false`)");
    suspend_pause.row("suspend pause (`stop: true`)");
    base.pause.row("baseline pause: `migrate` to a file");
    restore_local.row("restore to first HTTP response, local cache");
    restore_s3.row("restore to first HTTP response, S3 only");
    lazy_suspend_pause.row("suspend pause right after a wake from S3");
    lazy_suspend_total.row("suspend right after a wake from S3: request to snapshotted");
    lazy_cycle_stored.row_value("KiB stored per idle S3 wake + suspend cycle");
    base.restore
        .row("baseline restore: `-incoming` from the file");
    upload_mbps.row_value("upload MB/s (compressed)");
    download_mbps.row_value("restore from S3, touched MB/s");
    println!();
    let (first, second) = (stored[0], stored[1]);
    println!(
        "stored by the first snapshot: {:.1} MiB; by a second of the idle VM: {:.2} MiB ({:.1}%)",
        first as f64 / 1048576.0,
        second as f64 / 1048576.0,
        100.0 * second as f64 / first.max(1) as f64
    );
    println!(
        "ratios to the baseline (median): suspend pause {:.3}x, checkpoint pause {:.3}x, restore local {:.3}x, restore S3 {:.3}x; restore local / cold boot {:.3}x, fork / cold boot {:.3}x",
        suspend_pause.median() / base.pause.median(),
        checkpoint_pause.median() / base.pause.median(),
        restore_local.median() / base.restore.median(),
        restore_s3.median() / base.restore.median(),
        restore_local.median() / boot.median(),
        fork.median() / boot.median(),
    );
    Ok(())
}

/// Remove the local snapshot copies and disk layers of a suspended VM.
pub fn wipe_local(data_dir: &std::path::Path, vm: &str) -> anyhow::Result<()> {
    let snaps = data_dir.join("snapshots");
    // The daemon may still be writing into it (a fetched copy described
    // once durable, in the background): try again until it is gone.
    let mut attempts = 0;
    while snaps.exists() {
        match std::fs::remove_dir_all(&snaps) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty && attempts < 50 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).context("removing snapshots"),
        }
    }
    for entry in std::fs::read_dir(data_dir.join("vms").join(vm))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "qcow2") {
            std::fs::remove_file(path)?;
        }
    }
    Ok(())
}
