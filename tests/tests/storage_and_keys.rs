//! Local disk bounded by a budget, uploads and manifest deletions that
//! survive outages, garbage collection shared by two daemons, API keys,
//! secrets kept out of logs and child processes, and the default image
//! found without an extra step.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures_util::TryStreamExt;
use hatch_e2e::{Daemon, Garage, KEY, kv};
use object_store::path::Path as ObjPath;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn keys_under(garage: &Garage, prefix: &str) -> Vec<String> {
    garage
        .bucket()
        .list(Some(&ObjPath::from(prefix)))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap()
}

async fn storage(d: &Daemon) -> Value {
    let (s, v) = d.call(Method::GET, "/storage", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

/// Poll `f` until it holds (it reads the daemon's view, which changes in
/// the background).
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + hatch_e2e::PATIENCE;
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn local_copies_stay_within_their_budget_but_never_the_only_copy() {
    let mut garage = Garage::start().await;
    let mut env = garage.env();
    env.push(("HATCH_LOCAL_CACHE_MIB".into(), "1".into()));
    env.push(("HATCH_UPLOAD_RETRY_MAX_SECONDS".into(), "2".into()));
    let d = Daemon::start_with_env(env).await;
    let (id, boot) = d.boot_routed("b").await;
    assert_eq!(d.get_ok("b.localhost", "/counter").await, "counter=1\n");

    // Two snapshots in S3: their local copies exceed 1 MiB and go.
    let first = d.snapshot(&id, false).await;
    d.wait_snapshot(&id, &first, "ready").await;
    let second = d.snapshot(&id, true).await;
    d.wait_snapshot(&id, &second, "ready").await;
    eventually("copies in S3 evicted", || async {
        storage(&d).await["local"]["snapshots"] == 0
    })
    .await;
    let s = storage(&d).await;
    assert!(s["local"]["evictions"].as_u64().unwrap() >= 2, "{s}");
    assert_eq!(s["local"]["budget_bytes"], 1 << 20, "{s}");
    assert!(!d.data_dir.path().join("snapshots").join(&second).exists());
    assert!(
        d.metrics_text()
            .await
            .contains("hatch_local_snapshot_evictions_total")
    );

    // The evicted suspend wakes from S3.
    d.restore(&id, json!({})).await;
    assert_eq!(kv(&d.get_ok("b.localhost", "/").await, "boot_id"), boot);
    assert_eq!(d.get_ok("b.localhost", "/counter").await, "counter=2\n");

    // With S3 down, the only copy of a suspend stays, over budget.
    garage.stop();
    let third = d.snapshot(&id, true).await;
    d.wait_state(&id, "snapshotted").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = storage(&d).await;
    assert_eq!(s["local"]["snapshots"], 1, "{s}");
    assert!(s["local"]["bytes"].as_u64().unwrap() > 1 << 20, "{s}");
    assert!(
        d.data_dir
            .path()
            .join("snapshots")
            .join(&third)
            .join("mem")
            .exists()
    );
    d.restore(&id, json!({})).await;
    assert_eq!(d.get_ok("b.localhost", "/counter").await, "counter=3\n");
    garage.restart().await;
    d.wait_snapshot(&id, &third, "ready").await;
}

#[tokio::test]
async fn deleting_a_vm_during_its_upload_leaves_no_manifest_behind() {
    let mut garage = Garage::start().await;
    let mut env = garage.env();
    env.push(("HATCH_UPLOAD_RETRY_MAX_SECONDS".into(), "2".into()));
    let d = Daemon::start_with_env(env).await;
    let (gone, _) = d.boot_routed("gone").await;
    let (kept, _) = d.boot_routed("kept").await;
    let old = d.snapshot(&gone, false).await;
    d.wait_snapshot(&gone, &old, "ready").await;
    assert_eq!(
        keys_under(&garage, &format!("manifests/{gone}/"))
            .await
            .len(),
        1
    );

    // S3 goes down: a suspend's upload keeps failing and retrying, and the
    // deletion of the earlier manifest fails too.
    garage.stop();
    let pending = d.snapshot(&gone, true).await;
    d.wait_state(&gone, "snapshotted").await;
    let (s, _) = d.call(Method::DELETE, &format!("/vms/{gone}"), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // Both manifests' deletions (one written, one never) wait for S3.
    assert_eq!(storage(&d).await["pending_deletes"], 2);

    garage.restart().await;
    eventually("the failed manifest deletion retried", || async {
        storage(&d).await["pending_deletes"] == 0
    })
    .await;
    // Nothing of the deleted VM is left in S3, nor written later.
    let other = d.snapshot(&kept, false).await;
    d.wait_snapshot(&kept, &other, "ready").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        keys_under(&garage, &format!("manifests/{gone}/")).await,
        Vec::<String>::new(),
        "snapshot {pending} of the deleted vm"
    );
    assert_eq!(
        keys_under(&garage, &format!("manifests/{kept}/"))
            .await
            .len(),
        1
    );
}

/// Two daemons share one bucket and one snapshot secret: a collection run
/// by one keeps every chunk the other's manifests reference (the other's
/// snapshot then restores from S3 alone), and releases its bucket lock.
#[tokio::test]
async fn garbage_collection_is_safe_with_two_daemons_on_one_bucket() {
    let garage = Garage::start().await;
    let mut env = garage.env();
    env.push((
        "HATCH_SNAPSHOT_SECRET".into(),
        "shared-secret-0123456789".into(),
    ));
    env.push(("HATCH_GC_GRACE_SECONDS".into(), "0".into()));
    let a = Daemon::start_with_env(env.clone()).await;
    let b = Daemon::start_with_env(env).await;
    let (id, boot) = a.boot_routed("a").await;
    let (bid, _) = b.boot_routed("b").await;
    assert_eq!(a.get_ok("a.localhost", "/counter").await, "counter=1\n");
    let sid = a.snapshot(&id, true).await;
    a.wait_snapshot(&id, &sid, "ready").await;
    a.wait_state(&id, "snapshotted").await;
    let bsid = b.snapshot(&bid, false).await;
    b.wait_snapshot(&bid, &bsid, "ready").await;
    // B deletes its snapshot: its own chunks become garbage.
    let (s, _) = b
        .call(
            Method::DELETE,
            &format!("/vms/{bid}/snapshots/{bsid}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    let (s, report) = b.call(Method::POST, "/storage/gc", None).await;
    assert_eq!(s, StatusCode::OK, "{report}");
    assert!(report["deleted_chunks"].as_u64().unwrap() > 0, "{report}");
    assert!(
        report["manifests"].as_u64().unwrap() >= 1,
        "A's manifest was read: {report}"
    );
    assert!(
        keys_under(&garage, "locks/").await.is_empty(),
        "locks are released"
    );

    // A's snapshot lost nothing.
    a.wipe_local_snapshots(&id);
    a.restore(&id, json!({})).await;
    assert_eq!(kv(&a.get_ok("a.localhost", "/").await, "boot_id"), boot);
    assert_eq!(a.get_ok("a.localhost", "/counter").await, "counter=2\n");
}

#[tokio::test]
async fn api_keys_can_be_listed_created_and_revoked() {
    let mut d = Daemon::start().await;
    let url = d.api_url("/vms");
    let http = d.http.clone();
    let with = |key: String| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            http.get(&url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    let (s, made) = d
        .call(Method::POST, "/keys", Some(json!({ "name": "ci-bot" })))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{made}");
    let key = made["key"].as_str().unwrap().to_string();
    assert_eq!(with(key.clone()).await, StatusCode::OK);

    let (_, list) = d.call(Method::GET, "/keys", None).await;
    let keys = list["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{list}");
    assert!(!list.to_string().contains(&key), "listing never shows keys");
    assert!(
        keys.iter()
            .any(|k| k["name"] == "ci-bot" && k["source"] == "api")
    );
    assert!(keys.iter().any(|k| k["source"] == "env"));

    let (s, b) = d
        .call(Method::POST, "/keys", Some(json!({ "name": "no spaces" })))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    let (s, _) = d.call(Method::DELETE, "/keys/ci-bot", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(with(key).await, StatusCode::UNAUTHORIZED, "revoked at once");
    let (s, _) = d.call(Method::DELETE, "/keys/key-nope", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // A new HATCH_API_KEY replaces the previous one at the next start.
    let new_key = "hatch_e2e_rotated_key_9876543210";
    d.set_env("HATCH_API_KEY", Some(new_key));
    d.restart().await;
    assert_eq!(with(KEY.to_string()).await, StatusCode::UNAUTHORIZED);
    assert_eq!(with(new_key.to_string()).await, StatusCode::OK);
    // The last key cannot be revoked.
    let list: Value = d
        .http
        .get(d.api_url("/keys"))
        .bearer_auth(new_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let only = list["keys"][0]["id"].as_str().unwrap().to_string();
    let s = d
        .http
        .delete(d.api_url(&format!("/keys/{only}")))
        .bearer_auth(new_key)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(s, StatusCode::CONFLICT);
}

/// The API key, the S3 secret and the snapshot secret appear in no log
/// line, and in the environment of no process the daemon starts: QEMU,
/// and `qemu-img` (seen through a wrapper on PATH that records its
/// environment).
#[tokio::test]
async fn secrets_stay_out_of_logs_and_child_processes() {
    let garage = Garage::start().await;
    let wrappers = tempfile::tempdir().unwrap();
    let seen = wrappers.path().join("seen");
    std::fs::create_dir(&seen).unwrap();
    let real = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "command -v qemu-img"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let script = format!(
        "#!/bin/sh\nenv > {}/env.$$\nexec {} \"$@\"\n",
        seen.display(),
        real.trim()
    );
    let wrapper = wrappers.path().join("qemu-img");
    std::fs::write(&wrapper, script).unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&wrapper).unwrap().permissions(),
        0o755,
    );
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        wrappers.path().display(),
        std::env::var("PATH").unwrap()
    );
    let snapshot_secret = "snapshot-secret-do-not-leak-42";
    let mut env = garage.env();
    env.push(("PATH".into(), path));
    env.push(("HATCH_SNAPSHOT_SECRET".into(), snapshot_secret.into()));
    env.push(("HATCH_LOG".into(), "debug".into()));
    let d = Daemon::start_with_env(env).await;
    let (id, _) = d.boot_routed("s").await;
    let sid = d.snapshot(&id, true).await;
    d.wait_snapshot(&id, &sid, "ready").await;
    d.wait_state(&id, "snapshotted").await;
    d.wipe_local_snapshots(&id);
    d.restore(&id, json!({})).await; // qemu-img create and rebase

    let mut places = vec![("daemon log".to_string(), d.daemon_log())];
    for e in std::fs::read_dir(&seen).unwrap().flatten() {
        places.push((
            format!("qemu-img environment {}", e.path().display()),
            std::fs::read_to_string(e.path()).unwrap(),
        ));
    }
    assert!(
        places.len() >= 3,
        "qemu-img ran (create, rebase): {places:?}"
    );
    for pid in d.qemu_pids() {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        places.push((
            format!("QEMU {pid} environment"),
            String::from_utf8_lossy(&environ).into_owned(),
        ));
    }
    for (what, text) in &places {
        for secret in [KEY, garage.secret.as_str(), snapshot_secret] {
            assert!(!text.contains(secret), "a secret is in the {what}");
        }
        if what != "daemon log" {
            assert!(
                !text.contains("HATCH_"),
                "{what} sees the daemon's settings"
            );
        }
    }
}

#[tokio::test]
async fn the_default_image_is_found_without_a_step_and_its_absence_explained() {
    let empty = tempfile::tempdir().unwrap();
    let d = Daemon::start_with_env(vec![(
        "HATCH_IMAGE_CACHE_DIR".into(),
        empty.path().display().to_string(),
    )])
    .await;
    let (s, b) = d.call(Method::POST, "/vms", Some(json!({}))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    let msg = b["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("hatch image build --images-dir") && msg.contains("scripts/up.sh"),
        "{msg}"
    );
    // The harness's daemons have an empty images dir and find the default
    // image in the cache the set-up scripts fill.
    let d = Daemon::start().await;
    let (_, vm) = d.call(Method::POST, "/vms", Some(json!({}))).await;
    d.wait_state(vm["id"].as_str().unwrap(), "running").await;
}
