//! Snapshot API contract: storage required, listing, deletion, retention,
//! storage usage, validation.

#![allow(clippy::unwrap_used)]

use hatch_e2e::{Daemon, Garage};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn code(b: &Value) -> &str {
    b["error"]["code"].as_str().unwrap_or("<none>")
}

#[tokio::test]
async fn without_s3_every_snapshot_endpoint_is_unavailable_and_nothing_changes() {
    let d = Daemon::start().await;
    let id = d.create_vm(json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    for (method, path, body) in [
        (
            Method::POST,
            format!("/vms/{id}/snapshot"),
            json!({ "stop": true }),
        ),
        (Method::POST, format!("/vms/{id}/restore"), json!({})),
        (Method::GET, format!("/vms/{id}/snapshots"), Value::Null),
        (
            Method::GET,
            format!("/vms/{id}/snapshots/snap-x"),
            Value::Null,
        ),
        (
            Method::DELETE,
            format!("/vms/{id}/snapshots/snap-x"),
            Value::Null,
        ),
        (
            Method::PUT,
            format!("/vms/{id}/retention"),
            json!({ "keep_last": 1 }),
        ),
        (Method::GET, "/storage".to_string(), Value::Null),
    ] {
        let (s, b) = d
            .call(method.clone(), &path, (!body.is_null()).then_some(body))
            .await;
        assert_eq!(
            (s, code(&b)),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "snapshot_storage_unavailable"
            ),
            "{method} {path}"
        );
        assert!(
            b["error"]["message"]
                .as_str()
                .unwrap()
                .contains("snapshot storage is unavailable")
        );
    }
    d.wait_state(&id, "running").await;
}

#[tokio::test]
async fn listing_deletion_retention_and_storage_usage() {
    let garage = Garage::start().await;
    let d = Daemon::start_with_env(garage.env()).await;
    let id = d.create_vm(json!({})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    d.wait_state(&id, "running").await;

    // Bad input: 4xx and nothing changes.
    for body in [
        json!({ "stop": "yes" }),
        json!({ "stop": true, "extra": 1 }),
    ] {
        let (s, b) = d
            .call(Method::POST, &format!("/vms/{id}/snapshot"), Some(body))
            .await;
        assert_eq!(
            (s, code(&b)),
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            "{b}"
        );
    }
    for body in [
        json!({ "keep_last": 0 }),
        json!({ "max_age_seconds": 0 }),
        json!({ "keep": 1 }),
    ] {
        let (s, b) = d
            .call(Method::PUT, &format!("/vms/{id}/retention"), Some(body))
            .await;
        assert_eq!(
            (s, code(&b)),
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            "{b}"
        );
    }
    let (s, b) = d
        .call(
            Method::POST,
            &format!("/vms/{id}/restore"),
            Some(json!({ "snapshot_id": "snap-nope" })),
        )
        .await;
    assert_eq!((s, code(&b)), (StatusCode::NOT_FOUND, "not_found"));
    let (_, list) = d
        .call(Method::GET, &format!("/vms/{id}/snapshots"), None)
        .await;
    assert_eq!(list, json!({ "snapshots": [] }));
    assert_eq!(d.vm(&id).await["state"], "running");

    let mut ids = Vec::new();
    for _ in 0..3 {
        let sid = d.snapshot(&id, false).await;
        d.wait_snapshot(&id, &sid, "ready").await;
        ids.push(sid);
    }
    let listed = |list: &Value| -> Vec<String> {
        list["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, list) = d
        .call(Method::GET, &format!("/vms/{id}/snapshots"), None)
        .await;
    assert_eq!(
        listed(&list),
        [ids[2].clone(), ids[1].clone(), ids[0].clone()]
    );

    // The second snapshot of an idle VM stores a fraction of the first.
    let stored: Vec<u64> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stored_bytes"].as_u64().unwrap())
        .collect();
    assert!(stored[1] < stored[2], "dedup: {stored:?}");

    let (s, usage) = d.call(Method::GET, "/storage", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(usage["total"]["snapshots"], 3);
    assert_eq!(usage["total"]["stored_bytes"], stored.iter().sum::<u64>());
    assert_eq!(usage["vms"][0]["vm_id"], id.as_str());
    assert!(usage["vms"][0]["logical_bytes"].as_u64().unwrap() >= 3 * (256 << 20));

    // Retention keeps the newest two.
    let (s, r) = d
        .call(
            Method::PUT,
            &format!("/vms/{id}/retention"),
            Some(json!({ "keep_last": 2 })),
        )
        .await;
    assert_eq!(
        (s, r),
        (
            StatusCode::OK,
            json!({ "keep_last": 2, "max_age_seconds": null })
        )
    );
    let (_, list) = d
        .call(Method::GET, &format!("/vms/{id}/snapshots"), None)
        .await;
    assert_eq!(listed(&list), [ids[2].clone(), ids[1].clone()]);
    let (s, _) = d
        .call(
            Method::GET,
            &format!("/vms/{id}/snapshots/{}", ids[0]),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // ... and is applied after every new snapshot.
    let sid = d.snapshot(&id, false).await;
    d.wait_snapshot(&id, &sid, "ready").await;
    let (_, list) = d
        .call(Method::GET, &format!("/vms/{id}/snapshots"), None)
        .await;
    assert_eq!(listed(&list), [sid.clone(), ids[2].clone()]);

    // Deleting one snapshot never breaks another: the survivor restores.
    let (s, _) = d
        .call(Method::DELETE, &format!("/vms/{id}/snapshots/{sid}"), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    d.restore(&id, json!({ "snapshot_id": ids[2] })).await;

    // The only state of a suspended VM cannot be deleted.
    let (s, _) = d
        .call(
            Method::DELETE,
            &format!("/vms/{id}/snapshots/{}", ids[2]),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let older = d.snapshot(&id, false).await;
    d.wait_snapshot(&id, &older, "ready").await;
    let last = d.snapshot(&id, true).await;
    d.wait_snapshot(&id, &last, "ready").await;
    d.wait_state(&id, "snapshotted").await;
    // Nor the state a wake would restore, although an older one exists
    // (the VM would silently wake into the past).
    let (s, b) = d
        .call(Method::DELETE, &format!("/vms/{id}/snapshots/{last}"), None)
        .await;
    assert_eq!((s, code(&b)), (StatusCode::CONFLICT, "conflict"), "{b}");
    let (s, _) = d
        .call(
            Method::DELETE,
            &format!("/vms/{id}/snapshots/{older}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn garbage_collection_frees_only_unreferenced_chunks() {
    let garage = Garage::start().await;
    let mut env = garage.env();
    env.push(("HATCH_GC_GRACE_SECONDS".into(), "0".into()));
    let d = Daemon::start_with_env(env).await;
    let id = d.create_vm(json!({ "name": "gc" })).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    d.wait_state(&id, "running").await;
    d.create_route("gc.localhost", &id).await;
    d.wait_http("gc.localhost", "/").await;

    let old = d.snapshot(&id, false).await;
    d.wait_snapshot(&id, &old, "ready").await;
    // Change memory and disk so that the next snapshot has chunks of its own
    // and the old one keeps some that only it references.
    for i in 0..20 {
        let (s, _) = d
            .proxy_get("gc.localhost", &format!("/disk/write?name=k{i}&value=v{i}"))
            .await;
        assert_eq!(s, StatusCode::OK);
    }
    let (_, c) = d.proxy_get("gc.localhost", "/counter").await;
    assert_eq!(c, "counter=1\n");
    let new = d.snapshot(&id, true).await;
    d.wait_snapshot(&id, &new, "ready").await;
    d.wait_state(&id, "snapshotted").await;

    // Nothing is garbage while both manifests exist.
    let (s, r) = d.call(Method::POST, "/storage/gc", None).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(
        (r["manifests"].as_u64(), r["deleted_chunks"].as_u64()),
        (Some(2), Some(0)),
        "{r}"
    );

    let (s, _) = d
        .call(Method::DELETE, &format!("/vms/{id}/snapshots/{old}"), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, r) = d.call(Method::POST, "/storage/gc", None).await;
    assert_eq!(r["manifests"], 1);
    assert!(r["deleted_chunks"].as_u64().unwrap() > 0, "{r}");
    assert!(r["freed_bytes"].as_u64().unwrap() > 0, "{r}");
    let (_, again) = d.call(Method::POST, "/storage/gc", None).await;
    assert_eq!(again["deleted_chunks"], 0, "{again}");

    // The surviving snapshot restores from S3 alone.
    d.wipe_local_snapshots(&id);
    d.restore(&id, json!({})).await;
    let (_, c) = d.proxy_get("gc.localhost", "/counter").await;
    assert_eq!(c, "counter=2\n");
    let (_, v) = d.proxy_get("gc.localhost", "/disk/read?name=k19").await;
    assert_eq!(v, "value=v19\n");

    // Deleting the VM deletes its manifests: everything becomes garbage.
    let (s, _) = d.call(Method::DELETE, &format!("/vms/{id}"), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, r) = d.call(Method::POST, "/storage/gc", None).await;
    assert_eq!(r["manifests"], 0, "{r}");
    assert_eq!(r["deleted_chunks"], r["chunks"], "{r}");
}
