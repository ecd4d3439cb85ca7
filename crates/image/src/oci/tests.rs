//! Archives built here, in both formats, unpacked; and the refusals.

use std::io::Write;
use std::path::Path;

use serde_json::json;

use super::archive::hex_sha256;
use super::*;

enum E<'a> {
    File(&'a str, &'a [u8]),
    Dir(&'a str),
    Link(&'a str, &'a str),
}

fn layer(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        match e {
            E::File(path, data) => {
                h.set_size(data.len() as u64);
                h.set_mode(0o755);
                h.set_entry_type(tar::EntryType::Regular);
                b.append_data(&mut h, path, *data).unwrap();
            }
            E::Dir(path) => {
                h.set_size(0);
                h.set_mode(0o755);
                h.set_entry_type(tar::EntryType::Directory);
                b.append_data(&mut h, path, &[][..]).unwrap();
            }
            E::Link(path, target) => {
                h.set_size(0);
                h.set_entry_type(tar::EntryType::Symlink);
                b.append_link(&mut h, path, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// A layer whose one entry is named `name` verbatim (the builder refuses
/// `..`, an attacker would not).
fn raw_layer(name: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_size(4);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&h, &b"evil"[..]).unwrap();
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut g = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    g.write_all(data).unwrap();
    g.finish().unwrap()
}

fn config(arch: &str, diff_ids: &[String]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Entrypoint": ["/app/run.sh"],
            "Cmd": ["--port", "8080"],
            "Env": ["PATH=/bin", "GREETING=hello"],
            "WorkingDir": "/app",
            "User": "1000:1000",
            "ExposedPorts": {"8080/tcp": {}, "53/udp": {}, "9090/tcp": {}}
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    }))
    .unwrap()
}

/// Files of an archive, written as a tar to `path`.
fn write_outer(path: &Path, files: &[(String, Vec<u8>)]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    b.finish().unwrap();
}

fn descriptor(media: &str, data: &[u8]) -> serde_json::Value {
    json!({"mediaType": media, "digest": format!("sha256:{}", hex_sha256(data)), "size": data.len()})
}

/// An OCI layout archive of `layers` (gzip-compressed when flagged).
fn oci(path: &Path, layers: &[(Vec<u8>, bool)], arch: &str) -> Vec<(String, Vec<u8>)> {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|(l, _)| format!("sha256:{}", hex_sha256(l)))
        .collect();
    let cfg = config(arch, &diff_ids);
    let mut files = vec![(
        "oci-layout".to_string(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    )];
    let mut descs = Vec::new();
    for (l, gz) in layers {
        let (data, media) = if *gz {
            (gzip(l), "application/vnd.oci.image.layer.v1.tar+gzip")
        } else {
            (l.clone(), "application/vnd.oci.image.layer.v1.tar")
        };
        descs.push(descriptor(media, &data));
        files.push((format!("blobs/sha256/{}", hex_sha256(&data)), data));
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &cfg),
        "layers": descs,
    }))
    .unwrap();
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [descriptor("application/vnd.oci.image.manifest.v1+json", &manifest)],
    }))
    .unwrap();
    files.push((format!("blobs/sha256/{}", hex_sha256(&cfg)), cfg));
    files.push((format!("blobs/sha256/{}", hex_sha256(&manifest)), manifest));
    files.push(("index.json".to_string(), index));
    write_outer(path, &files);
    files
}

fn two_layers() -> Vec<(Vec<u8>, bool)> {
    let lower = layer(&[
        E::Dir("etc"),
        E::File("etc/keep", b"kept"),
        E::File("etc/gone", b"whited out"),
        E::Dir("data"),
        E::File("data/old", b"hidden by an opaque dir"),
        E::Dir("app"),
    ]);
    let upper = layer(&[
        E::File("etc/.wh.gone", b""),
        E::File("data/.wh..wh..opq", b""),
        E::File("data/new", b"fresh"),
        E::File("app/run.sh", b"#!/bin/sh\n"),
        E::Link("app/link", "run.sh"),
    ]);
    vec![(lower, false), (upper, true)]
}

fn read(root: &Path, rel: &str) -> Option<String> {
    std::fs::read_to_string(root.join(rel)).ok()
}

fn check_two_layers(u: &Unpacked) {
    let r = &u.rootfs;
    assert_eq!(read(r, "etc/keep").as_deref(), Some("kept"));
    assert!(!r.join("etc/gone").exists(), "whiteout applied");
    assert!(!r.join("data/old").exists(), "opaque dir emptied");
    assert_eq!(read(r, "data/new").as_deref(), Some("fresh"));
    assert_eq!(read(r, "app/link").as_deref(), Some("#!/bin/sh\n"));
    assert!(!r.join("data/.wh..wh..opq").exists() && !r.join("etc/.wh.gone").exists());
    assert_eq!(u.layers.len(), 2);
    assert_eq!(
        u.app,
        AppConfig {
            entrypoint: vec!["/app/run.sh".into()],
            cmd: vec!["--port".into(), "8080".into()],
            env: vec!["PATH=/bin".into(), "GREETING=hello".into()],
            working_dir: "/app".into(),
            user: "1000:1000".into(),
            exposed_ports: vec![8080, 9090],
        }
    );
    assert_eq!(u.app.argv(), ["/app/run.sh", "--port", "8080"]);
}

#[test]
fn an_oci_archive_unpacks_with_whiteouts_and_its_config() {
    let t = tempfile::tempdir().unwrap();
    let archive = t.path().join("image.tar");
    oci(&archive, &two_layers(), "amd64");
    let u = unpack(&archive, &t.path().join("work")).unwrap();
    check_two_layers(&u);
    assert!(u.bytes >= 14, "{}", u.bytes);
}

#[test]
fn a_docker_save_archive_unpacks_the_same() {
    let t = tempfile::tempdir().unwrap();
    let layers = two_layers();
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|(l, _)| format!("sha256:{}", hex_sha256(l)))
        .collect();
    let cfg = config("amd64", &diff_ids);
    let cfg_name = format!("{}.json", hex_sha256(&cfg));
    let mut files = vec![(cfg_name.clone(), cfg)];
    let mut names = Vec::new();
    for (i, (l, _)) in layers.iter().enumerate() {
        let name = format!("layer{i}/layer.tar");
        files.push((name.clone(), l.clone()));
        names.push(name);
    }
    let manifest = json!([{"Config": cfg_name, "RepoTags": ["app:latest"], "Layers": names}]);
    files.push((
        "manifest.json".into(),
        serde_json::to_vec(&manifest).unwrap(),
    ));
    let archive = t.path().join("docker.tar");
    write_outer(&archive, &files);
    check_two_layers(&unpack(&archive, &t.path().join("work")).unwrap());

    // A layer that is not the one the config names is refused.
    files[1].1 = layer(&[E::File("etc/keep", b"tampered")]);
    write_outer(&archive, &files);
    let err = unpack(&archive, &t.path().join("work2")).unwrap_err();
    assert!(
        err.to_string().contains("does not match its digest"),
        "{err}"
    );
}

fn refused(files: &[(String, Vec<u8>)], t: &Path, what: &str) -> String {
    let archive = t.join(format!("{what}.tar"));
    write_outer(&archive, files);
    unpack(&archive, &t.join(format!("work-{what}")))
        .unwrap_err()
        .to_string()
}

#[test]
fn missing_tampered_and_foreign_images_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let files = oci(&t.path().join("ok.tar"), &two_layers(), "amd64");
    let is_layer = |(name, data): &(String, Vec<u8>)| {
        name.starts_with("blobs/") && data.len() > 512 && !data.starts_with(b"{")
    };

    let mut missing = files.clone();
    let i = missing.iter().position(is_layer).unwrap();
    missing.remove(i);
    let err = refused(&missing, t.path(), "missing");
    assert!(err.contains("missing from the archive"), "{err}");

    let mut tampered = files.clone();
    let i = tampered.iter().position(is_layer).unwrap();
    let last = tampered[i].1.len() - 1;
    tampered[i].1[last] ^= 1;
    let err = refused(&tampered, t.path(), "tampered");
    assert!(err.contains("does not match its digest"), "{err}");

    let arm = oci(&t.path().join("arm.tar"), &two_layers(), "arm64");
    let err = refused(&arm, t.path(), "arm");
    assert!(
        err.contains("no linux/amd64 image (it has linux/arm64)"),
        "{err}"
    );

    let err = refused(&[("readme".into(), b"hi".to_vec())], t.path(), "other");
    assert!(err.contains("not an OCI image archive"), "{err}");
}

#[test]
fn layers_cannot_write_or_delete_outside_the_root() {
    let t = tempfile::tempdir().unwrap();
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("precious"), b"keep").unwrap();

    let escape = raw_layer(b"../../outside/evil");
    let archive = t.path().join("escape.tar");
    oci(&archive, &[(escape, false)], "amd64");
    let err = unpack(&archive, &t.path().join("w1")).unwrap_err();
    assert!(err.to_string().contains("outside"), "{err}");
    assert!(!outside.join("evil").exists());

    // A symlink to outside, then a whiteout through it.
    let link = layer(&[E::Link("out", outside.to_str().unwrap())]);
    let through = layer(&[E::File("out/.wh.precious", b"")]);
    let archive = t.path().join("through.tar");
    oci(&archive, &[(link, false), (through, false)], "amd64");
    let err = unpack(&archive, &t.path().join("w2")).unwrap_err();
    assert!(err.to_string().contains("symlink"), "{err}");
    assert!(outside.join("precious").exists());

    // And a file written through it.
    let link = layer(&[E::Link("out", outside.to_str().unwrap())]);
    let write = layer(&[E::File("out/evil", b"x")]);
    let archive = t.path().join("write.tar");
    oci(&archive, &[(link, false), (write, false)], "amd64");
    assert!(unpack(&archive, &t.path().join("w3")).is_err());
    assert!(!outside.join("evil").exists());
}

#[test]
fn an_import_becomes_an_image_with_an_ext4_root_and_its_app() {
    let t = tempfile::tempdir().unwrap();
    let archive = t.path().join("image.tar");
    oci(&archive, &two_layers(), "amd64");
    let store = crate::ImageStore::open(t.path().join("images")).unwrap();
    std::fs::write(t.path().join("vmlinuz"), b"kernel").unwrap();
    std::fs::write(t.path().join("initrd"), b"initrd").unwrap();
    let base = crate::Image {
        name: "default".into(),
        kernel: t.path().join("vmlinuz"),
        initrd: t.path().join("initrd"),
        disk: t.path().join("unused"),
        disk_format: "raw".into(),
        disk_mib: 1024,
        cmdline: "console=ttyS0".into(),
        created_at: String::new(),
        agent: true,
        app: None,
        id: None,
    };
    let image = store.import("myapp", "img-1", &archive, &base).unwrap();
    assert_eq!(store.get("myapp").unwrap(), image);
    assert_eq!(image.app.as_ref().unwrap().exposed_ports, [8080, 9090]);
    assert_eq!(image.cmdline, "console=ttyS0");
    assert!(image.disk_mib >= 128);
    let cat = |path: &str| {
        let out = std::process::Command::new("debugfs")
            .args(["-R", &format!("cat {path}")])
            .arg(&image.disk)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(cat("/data/new"), "fresh");
    let app: AppConfig = serde_json::from_str(&cat("/.hatch/app.json")).unwrap();
    assert_eq!(Some(&app), image.app.as_ref());

    // The name is taken now; a bad archive leaves nothing behind.
    assert!(matches!(
        store.import("myapp", "img-1", &archive, &base),
        Err(crate::ImageError::AlreadyExists(_))
    ));
    std::fs::write(t.path().join("bad.tar"), b"not a tar").unwrap();
    assert!(
        store
            .import("bad", "img-2", &t.path().join("bad.tar"), &base)
            .is_err()
    );
    let names: Vec<_> = std::fs::read_dir(store.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["myapp"]);
}
