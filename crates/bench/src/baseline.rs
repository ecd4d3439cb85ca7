//! The baseline: what a user would script by hand with QEMU alone. Same
//! image, same machine; `stop` + `migrate` of everything (RAM included) to a
//! file, and a new QEMU with `-incoming` from it.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hatch_vmm::{AccelChoice, Machine, MachineSpec, PortForward};

use crate::stats::Samples;

pub struct Baseline {
    pub pause: Samples,
    pub restore: Samples,
}

pub async fn run(
    images_dir: &Path,
    image: &str,
    memory_mib: u64,
    runs: usize,
) -> anyhow::Result<Baseline> {
    let image = hatch_image::ImageStore::open(images_dir)?.get(image)?;
    let dir = tempfile::Builder::new()
        .prefix("hatch-baseline-")
        .tempdir_in("/dev/shm")?;
    let disk = dir.path().join("disk.qcow2");
    hatch_vmm::disk::create_overlay(&image.disk, &image.disk_format, &disk, image.disk_mib).await?;
    let spec = |incoming: bool| -> anyhow::Result<MachineSpec> {
        Ok(MachineSpec {
            accel: AccelChoice::Auto.resolve(),
            cpu_model: hatch_vmm::spec::default_cpu_model(AccelChoice::Auto.resolve()).into(),
            vcpus: 1,
            memory_mib,
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
            cmdline: image.cmdline.clone(),
            disk: disk.clone(),
            disk_node: "disk".into(),
            mem_path: dir.path().join("mem"),
            qmp_socket: dir.path().join("qmp"),
            agent_socket: dir.path().join("agent"),
            console_log: dir.path().join("console.log"),
            pid_file: dir.path().join("pid"),
            forwards: vec![PortForward {
                host: hatch_vmm::host::free_port()?,
                guest: 8080,
            }],
            tsc_khz: hatch_vmm::host::tsc_khz(),
            extra_cmdline: Vec::new(),
            incoming,
            egress_tap: None,
        })
    };
    let qemu = Path::new("qemu-system-x86_64");
    let first = spec(false)?;
    let mut machine = Machine::launch(qemu, &first).await?;
    wait_http(first.forwards[0].host).await?;
    wait_console(&first.console_log, "hatch-guest: touched").await?;

    let state = dir.path().join("migration.bin");
    let mut out = Baseline {
        pause: Samples::default(),
        restore: Samples::default(),
    };
    for _ in 0..runs {
        let t0 = Instant::now();
        machine.pause().await?;
        machine.migrate_to_file(&state).await?;
        out.pause.push(t0.elapsed());
        machine.quit().await?;
        // A fresh RAM file: the stream carries the memory.
        std::fs::remove_file(dir.path().join("mem"))?;

        let t0 = Instant::now();
        let next = spec(true)?;
        machine = Machine::launch(qemu, &next).await?;
        machine.migrate_from_file(&state).await?;
        wait_http(next.forwards[0].host).await?;
        out.restore.push(t0.elapsed());
    }
    machine.quit().await?;
    Ok(out)
}

async fn wait_http(port: u16) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let r = http.get(format!("http://127.0.0.1:{port}/")).send().await;
        if matches!(&r, Ok(r) if r.status().is_success()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("baseline VM never answered");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_console(log: &Path, needle: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let text = std::fs::read_to_string(log).context("console log")?;
        if text.contains(needle) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("baseline console never showed {needle:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
