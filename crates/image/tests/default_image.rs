//! Builds the real default image when a kernel package and a static guest binary are given:
//!
//! `HATCH_TEST_KERNEL_DEB=/path/linux-image-…-cloud-amd64_…_amd64.deb
//!  HATCH_TEST_GUEST_BIN=target/x86_64-unknown-linux-gnu/release/hatch-guest
//!  cargo test -p hatch-image --test default_image`
//!
//! Without them the test is skipped (it needs dpkg-deb, mkfs.ext4 and busybox-static).

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::PathBuf;

use hatch_image::{BuildOptions, ImageStore, build_default};

fn read_archive(path: &std::path::Path) -> HashMap<String, (u32, Vec<u8>)> {
    let mut f = File::open(path).expect("open initrd");
    let mut out = HashMap::new();
    loop {
        let mut r = cpio::NewcReader::new(f).expect("cpio header");
        if r.entry().is_trailer() {
            break;
        }
        let name = r.entry().name().to_string();
        let mode = r.entry().mode();
        let mut data = Vec::new();
        r.read_to_end(&mut data).expect("cpio member");
        out.insert(name, (mode, data));
        f = r.finish().expect("cpio member end");
    }
    out
}

#[test]
fn builds_the_default_image() {
    let (Some(deb), Some(guest)) = (
        std::env::var_os("HATCH_TEST_KERNEL_DEB"),
        std::env::var_os("HATCH_TEST_GUEST_BIN"),
    ) else {
        eprintln!("HATCH_TEST_KERNEL_DEB / HATCH_TEST_GUEST_BIN not set; skipping");
        return;
    };
    let deb = PathBuf::from(deb);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    std::fs::create_dir_all(cache.join("debs")).unwrap();
    std::fs::copy(&deb, cache.join("debs").join(deb.file_name().unwrap())).unwrap();
    let store = ImageStore::open(tmp.path().join("images")).unwrap();
    let opts = BuildOptions {
        name: "default".into(),
        cache_dir: cache,
        guest_bin: PathBuf::from(guest),
        disk_mib: 64,
        force: false,
    };
    let img = build_default(&store, &opts).unwrap();
    assert_eq!(img.disk_format, "raw");
    assert_eq!(img.disk_mib, 64);
    assert!(img.cmdline.contains("console=ttyS0"));
    assert_eq!(std::fs::metadata(&img.disk).unwrap().len(), 64 << 20);
    assert_eq!(store.get("default").unwrap(), img);

    let files = read_archive(&img.initrd);
    let init = String::from_utf8(files["init"].1.clone()).unwrap();
    assert_eq!(files["init"].0 & 0o777, 0o755);
    for m in [
        "virtio_ring",
        "virtio",
        "virtio_mmio",
        "virtio_blk",
        "failover",
        "net_failover",
        "virtio_net",
    ] {
        let ko = &files[&format!("lib/modules/{m}.ko")].1;
        assert!(ko.starts_with(b"\x7fELF"), "{m}");
        assert!(init.contains(m), "{m}");
    }
    // Load order: dependencies first.
    let order = |m: &str| init.find(&format!(" {m} ")).unwrap();
    assert!(order("virtio_ring") < order("virtio_mmio"));
    assert!(order("failover") < order("net_failover"));
    assert!(order("net_failover") < order("virtio_net"));
    assert!(files.contains_key("bin/hatch-guest"));
    assert!(files.contains_key("bin/busybox"));
    assert!(files.contains_key("bin/sh"));

    // Idempotent: a second build reuses everything.
    let before = std::fs::metadata(&img.initrd).unwrap().modified().unwrap();
    let again = build_default(&store, &opts).unwrap();
    assert_eq!(again, img);
    assert_eq!(
        std::fs::metadata(&img.initrd).unwrap().modified().unwrap(),
        before
    );
}
