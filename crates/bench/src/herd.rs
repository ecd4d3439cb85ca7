//! `hatch-bench herd`: many suspended VMs woken by one request each at the
//! same moment, next to a single wake measured in the same run.
//!
//! Each answer's `time=` is compared with the host's clock when the answer
//! arrived: a guest resumed without its clock put right would be behind by
//! the time it spent suspended (the benchmark keeps the VMs suspended for
//! [`SUSPENDED_FOR`] so that such a clock cannot pass). Each wake's event
//! must be free of errors; a wake whose clock and RNG sync needed retries
//! says so in its warnings, which are counted.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use futures_util::future::try_join_all;
use serde_json::{Value, json};

use crate::api::Api;
use crate::hostcpu::{self, HostCpu};
use crate::stats::Samples;

/// How long the VMs stay suspended before a wake. Longer than any clock
/// error the check tolerates, so a guest resumed with its clock as it stood
/// at the suspend is caught.
const SUSPENDED_FOR: Duration = Duration::from_secs(4);
/// Largest accepted |host - guest| clock difference at the answer (the
/// answer's own travel included).
const MAX_CLOCK_OFFSET_SECS: f64 = 1.0;

#[derive(clap::Args)]
pub struct HerdArgs {
    #[command(flatten)]
    common: crate::Args,
    /// VMs in the herd.
    #[arg(long, default_value_t = 8)]
    vms: usize,
    /// Memory of each VM of the herd (MiB).
    #[arg(long, default_value_t = 256)]
    herd_memory_mib: u64,
}

/// One wake: its latency to the first answer and the guest's clock offset.
struct Woken {
    latency: Duration,
    offset_secs: f64,
}

pub async fn run(args: HerdArgs) -> anyhow::Result<()> {
    let c = &args.common;
    let api = Api::new(&c.api, &c.api_key, &c.proxy);
    let (n, count) = (c.runs, args.vms);
    println!(
        "hatch-bench herd: {count} VMs of {} MiB (default image), suspended {} s, woken at once; {n} rounds; accel {}",
        args.herd_memory_mib,
        SUSPENDED_FOR.as_secs(),
        hatch_vmm::AccelChoice::Auto.resolve()
    );
    let mut vms = Vec::new();
    for i in 0..count {
        let vm = api
            .create_vm(json!({ "name": format!("herd-{i}"), "memory_mib": args.herd_memory_mib }))
            .await?;
        let host = format!("herd-{i}.bench.localhost");
        api.route(&host, &vm).await?;
        vms.push((vm, host));
    }
    for (_, host) in &vms {
        api.wait_http(host).await?;
    }

    // A single wake, the others suspended and quiet.
    let mut single = Samples::default();
    let mut single_cpu = Samples::default();
    let mut offsets = Samples::default();
    let mut retried = 0usize;
    let all: Vec<&(String, String)> = vms.iter().collect();
    suspend(&api, &all).await?;
    let (first, first_host) = &vms[0];
    for round in 0..n {
        if round > 0 {
            suspend(&api, &[&vms[0]]).await?;
        }
        tokio::time::sleep(SUSPENDED_FOR).await;
        let cpu = HostCpu::now()?;
        let w = wake(&api, first_host).await?;
        single_cpu.push(cpu.busy_since()?);
        retried += check_event(&api, first).await?;
        single.push(w.latency);
        offsets.push_value(w.offset_secs.abs() * 1000.0);
    }

    // The herd: every VM suspended, then one request each, all at once.
    let mut herd = Samples::default();
    let mut slowest = Samples::default();
    let mut round_cpu = Samples::default();
    let mut floor = Samples::default();
    let cores = hostcpu::cores();
    for round in 0..n {
        // After the single wakes only the first VM runs; later, all do.
        if round == 0 {
            suspend(&api, &[&vms[0]]).await?;
        } else {
            suspend(&api, &all).await?;
        }
        tokio::time::sleep(SUSPENDED_FOR).await;
        let start = tokio::sync::Barrier::new(count);
        let cpu = HostCpu::now()?;
        let woken = try_join_all(vms.iter().map(|(_, host)| {
            let (api, start) = (&api, &start);
            async move {
                start.wait().await;
                wake(api, host).await
            }
        }))
        .await?;
        let busy = cpu.busy_since()?;
        round_cpu.push(busy);
        floor.push(busy / cores as u32);
        let mut worst = Duration::ZERO;
        for w in &woken {
            herd.push(w.latency);
            offsets.push_value(w.offset_secs.abs() * 1000.0);
            worst = worst.max(w.latency);
        }
        slowest.push(worst);
        for (vm, _) in &vms {
            retried += check_event(&api, vm).await?;
        }
    }
    for (vm, _) in &vms {
        api.delete_vm(vm).await?;
    }

    println!();
    println!("| measurement | min | median | max |");
    println!("|---|---|---|---|");
    single.row("single wake (others suspended), first proxied response");
    herd.row(&format!(
        "herd of {count}: each VM's first proxied response"
    ));
    slowest.row(&format!("herd of {count}: the slowest VM of the round"));
    single_cpu.row("single wake: host CPU busy during it (all cores)");
    round_cpu.row(&format!(
        "herd of {count}: host CPU busy during the round (all cores)"
    ));
    floor.row(&format!(
        "herd of {count}: the round's CPU floor (busy time / {cores} cores)"
    ));
    offsets.row_value("|host - guest| clock at the answer, ms (all wakes)");
    println!();
    println!(
        "herd / single wake (medians): each {:.2}x, slowest {:.2}x; wakes whose clock/RNG sync needed retries: {retried}; wakes with a stale clock or unsynced RNG: 0 (checked)",
        herd.median() / single.median(),
        slowest.median() / single.median(),
    );
    // No schedule ends a round before its CPU time spread over every core
    // has passed, so this ratio is the best the herd can do on this host.
    println!(
        "CPU floor / single wake (medians): {:.2}x; slowest / CPU floor: {:.2}x (1.00 = the round is purely CPU-bound)",
        floor.median() / single.median(),
        slowest.median() / floor.median(),
    );
    Ok(())
}

/// Suspend the VMs (all at once) and wait until each is suspended with its
/// snapshot ready.
async fn suspend(api: &Api, vms: &[&(String, String)]) -> anyhow::Result<()> {
    try_join_all(vms.iter().map(|(vm, _)| async move {
        let sid = api.snapshot(vm, true).await?;
        api.wait_snapshot(vm, &sid).await?;
        api.wait_state(vm, "snapshotted").await?;
        anyhow::Ok(())
    }))
    .await?;
    Ok(())
}

/// One request that wakes the VM: its latency, and the guest's clock
/// checked against the host's.
async fn wake(api: &Api, host: &str) -> anyhow::Result<Woken> {
    let t0 = Instant::now();
    let (status, body) = api.proxy_get_body(host, "/").await?;
    let latency = t0.elapsed();
    let host_now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
    if status != 200 {
        bail!("the wake of {host} answered {status}: {body}");
    }
    let guest: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("time="))
        .context("no time= in the answer")?
        .trim()
        .parse()
        .context("time= is not a number")?;
    let offset_secs = host_now - guest;
    if offset_secs.abs() > MAX_CLOCK_OFFSET_SECS {
        bail!("{host} resumed with a stale clock: {offset_secs:.3} s behind the host");
    }
    Ok(Woken {
        latency,
        offset_secs,
    })
}

/// The VM's newest wake event must have succeeded; 1 if its clock and RNG
/// sync needed retries, else 0.
async fn check_event(api: &Api, vm: &str) -> anyhow::Result<usize> {
    let events = api.events(vm).await?;
    // Newest first (the API's order; `at` has whole seconds only).
    let wake: &Value = events
        .iter()
        .find(|e| e["kind"] == "wake")
        .with_context(|| format!("{vm} has no wake event"))?;
    if let Some(e) = wake["error"].as_str() {
        bail!("the wake of {vm} failed: {e}");
    }
    let retried = wake["warnings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .any(|w| w.contains("clock and RNG sync"));
    Ok(usize::from(retried))
}
