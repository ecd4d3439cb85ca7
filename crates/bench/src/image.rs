//! `hatch-bench image`: a container image of `--payload-mib` (busybox, an
//! HTTP server script, incompressible filler) built here as an OCI archive,
//! then: its import time (`POST /images`), cold boot of a VM of it to the
//! first proxied response, and its wake after a suspend (local copy, S3
//! only, S3 on a node that must fetch the image too), next to the default
//! image's boot and wake in the same run.

use std::time::Instant;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::api::Api;
use crate::stats::Samples;

#[derive(clap::Args)]
pub struct ImageArgs {
    #[command(flatten)]
    common: crate::Args,
    /// Size of the filler file in the image.
    #[arg(long, default_value_t = 100)]
    payload_mib: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Wake {
    Local,
    S3,
    S3NoImage,
}

const START: &str = "#!/bin/sh\nexec httpd -f -p 8080 -h /www\n";

pub async fn run(args: ImageArgs) -> anyhow::Result<()> {
    let c = &args.common;
    let api = Api::new(&c.api, &c.api_key, &c.proxy);
    let n = c.runs;
    let archive = oci_archive(args.payload_mib)?;
    println!(
        "hatch-bench image: a {:.1} MiB OCI archive ({} MiB filler), 256 MiB guests, {n} runs each",
        archive.len() as f64 / (1 << 20) as f64,
        args.payload_mib
    );

    let mut import = Samples::default();
    let mut name = String::new();
    for i in 0..n {
        name = format!("bench-app-{i}");
        let _ = api.delete_image(&name).await;
        let t0 = Instant::now();
        api.import_image(&name, archive.clone()).await?;
        import.push(t0.elapsed());
    }

    let mut rows = Vec::new();
    for (label, image) in [
        ("imported image", name.as_str()),
        ("default image", "default"),
    ] {
        let mut boot = Samples::default();
        let mut local = Samples::default();
        let mut s3 = Samples::default();
        let mut elsewhere = Samples::default();
        for i in 0..n {
            let t0 = Instant::now();
            let vm = api.create_vm(json!({ "image": image })).await?;
            let host = format!("{image}-{i}.img.bench.localhost");
            api.route(&host, &vm).await?;
            if api.proxy_get(&host, "/").await? != 200 {
                api.wait_http(&host).await?;
            }
            boot.push(t0.elapsed());
            // The wakes: from the local copy; from S3 alone; and, for the
            // imported image, from S3 on a node without the image (as on
            // another node of a cluster: its copy is removed, so the wake
            // fetches the image first).
            let imported = image != "default";
            for (wake, samples) in [
                (Wake::Local, &mut local),
                (Wake::S3, &mut s3),
                (Wake::S3NoImage, &mut elsewhere),
            ] {
                if wake == Wake::S3NoImage && !imported {
                    continue;
                }
                let sid = api.snapshot(&vm, true).await?;
                api.wait_snapshot(&vm, &sid).await?;
                api.wait_state(&vm, "snapshotted").await?;
                if wake != Wake::Local {
                    crate::wipe_local(&c.data_dir, &vm)?;
                }
                if wake == Wake::S3NoImage {
                    let dir = c.images_dir.join(image);
                    std::fs::remove_dir_all(&dir)
                        .with_context(|| format!("removing {}", dir.display()))?;
                }
                let t0 = Instant::now();
                let status = api.proxy_get(&host, "/").await?;
                if status != 200 {
                    bail!("the wake answered {status}");
                }
                samples.push(t0.elapsed());
            }
            api.delete_vm(&vm).await?;
        }
        rows.push((label, boot, local, s3, elsewhere));
    }
    for i in 0..n {
        let _ = api.delete_image(&format!("bench-app-{i}")).await;
    }

    println!();
    println!("| measurement | min | median | max |");
    println!("|---|---|---|---|");
    import.row(&format!(
        "import of the {} MiB image (upload, unpack, ext4)",
        args.payload_mib
    ));
    for (label, boot, local, s3, elsewhere) in &rows {
        boot.row(&format!("{label}: create to first proxied response"));
        local.row(&format!("{label}: wake, local copy"));
        s3.row(&format!("{label}: wake, S3 only"));
        if !elsewhere.is_empty() {
            elsewhere.row(&format!(
                "{label}: wake, S3 only, image fetched too (a node without it)"
            ));
        }
    }
    println!();
    let (imported, default) = (&rows[0], &rows[1]);
    println!(
        "imported / default (medians): boot {:.2}x, wake local {:.2}x, wake S3 {:.2}x; \
         imported, wake with the image fetched / wake S3: {:.2}x",
        imported.1.median() / default.1.median(),
        imported.2.median() / default.2.median(),
        imported.3.median() / default.3.median(),
        imported.4.median() / imported.3.median()
    );
    Ok(())
}

fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn append(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    b.append_data(&mut h, path, data)?;
    Ok(())
}

fn link(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) -> anyhow::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    b.append_link(&mut h, path, target)?;
    Ok(())
}

/// Incompressible bytes (xorshift), so that no layer of the path gets a
/// free ride from compression or zero detection.
fn filler(mib: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut v = Vec::with_capacity(mib << 20);
    while v.len() < mib << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

/// An OCI image layout archive: busybox + the server script, then the filler.
fn oci_archive(payload_mib: usize) -> anyhow::Result<Vec<u8>> {
    let busybox = std::fs::read("/bin/busybox").context("reading /bin/busybox (busybox-static)")?;
    let mut base = tar::Builder::new(Vec::new());
    append(&mut base, "bin/busybox", &busybox, 0o755)?;
    for applet in ["sh", "httpd"] {
        link(&mut base, &format!("bin/{applet}"), "busybox")?;
    }
    append(&mut base, "app/start.sh", START.as_bytes(), 0o755)?;
    append(
        &mut base,
        "www/index.html",
        b"hello from an imported image\n",
        0o644,
    )?;
    let mut data = tar::Builder::new(Vec::new());
    append(&mut data, "data/filler.bin", &filler(payload_mib), 0o644)?;
    let layers = [base.into_inner()?, data.into_inner()?];
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", sha256(l)))
        .collect();
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/app/start.sh"], "Env": ["PATH=/bin"], "ExposedPorts": {"8080/tcp": {}}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    }))?;
    let desc = |media: &str, d: &[u8]| -> Value {
        json!({"mediaType": media, "digest": format!("sha256:{}", sha256(d)), "size": d.len()})
    };
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "config": desc("application/vnd.oci.image.config.v1+json", &config),
        "layers": layers.iter().map(|l| desc("application/vnd.oci.image.layer.v1.tar", l)).collect::<Vec<_>>(),
    }))?;
    let index = serde_json::to_vec(&json!({"schemaVersion": 2,
        "manifests": [desc("application/vnd.oci.image.manifest.v1+json", &manifest)]}))?;
    let mut out = tar::Builder::new(Vec::new());
    append(
        &mut out,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
        0o644,
    )?;
    append(&mut out, "index.json", &index, 0o644)?;
    for blob in layers.iter().chain([&config, &manifest]) {
        append(
            &mut out,
            &format!("blobs/sha256/{}", sha256(blob)),
            blob,
            0o644,
        )?;
    }
    Ok(out.into_inner()?)
}
