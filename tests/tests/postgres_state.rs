//! State in a real PostgreSQL (`--database-url`): the store passes the same
//! suite as SQLite, a daemon on it keeps its VMs across restarts and wakes
//! them from S3, and a database outage fails API calls cleanly (503,
//! nothing changed) while running VMs keep serving; calls work again once
//! the database is back.

#![allow(clippy::unwrap_used)]

use hatch_e2e::{Daemon, Garage, Postgres, kv};
use hatch_server::state::{PgStore, StateStore, conformance};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn the_postgres_store_passes_the_store_suite() {
    let pg = Postgres::start();
    let store = PgStore::connect(&pg.url()).await.unwrap();
    conformance::run(&store).await;
    // Reconnecting finds the schema in place (no second migration).
    let again = PgStore::connect(&pg.url()).await.unwrap();
    assert!(again.get_vm("vm-a1").await.unwrap().is_some());
}

#[tokio::test]
async fn nodes_starting_together_migrate_the_schema_once() {
    let pg = Postgres::start();
    let url = pg.url();
    let connects = (0..4).map(|_| PgStore::connect(&url));
    for store in futures_util::future::join_all(connects).await {
        let store = store.expect("every node connects");
        assert!(store.list_vms().await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn an_unreachable_database_stops_the_daemon_with_a_clear_error() {
    let mut pg = Postgres::start();
    let url = pg.url();
    pg.stop();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(hatch_e2e::hatch_bin())
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args(["--api-addr", "127.0.0.1:0", "--proxy-addr", "127.0.0.1:0"])
        .env("HATCH_DATABASE_URL", &url)
        .env("HATCH_API_KEY", hatch_e2e::KEY)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("opening the state store") && err.contains("unreachable"),
        "{err}"
    );
}

#[tokio::test]
async fn a_daemon_on_postgres_keeps_its_vms_and_wakes_them_from_s3() {
    let pg = Postgres::start();
    let garage = Garage::start().await;
    let mut env = garage.env();
    env.push(("HATCH_DATABASE_URL".into(), pg.url()));
    let mut d = Daemon::start_with_env(env).await;
    let (id, boot) = d.boot_routed("pg").await;
    assert_eq!(
        d.get_ok("pg.localhost", "/counter").await.trim(),
        "counter=1"
    );
    let sid = d.snapshot(&id, true).await;
    d.wait_snapshot(&id, &sid, "ready").await;
    d.wait_state(&id, "snapshotted").await;
    assert!(
        !d.data_dir.path().join("hatch.db").exists(),
        "state went to PostgreSQL, not SQLite"
    );

    // A restart finds everything in the database; the wake reads S3 alone.
    d.kill_daemon();
    d.wipe_local_snapshots(&id);
    d.restart().await;
    assert_eq!(d.vm(&id).await["state"], "snapshotted");
    let root = d.get_ok("pg.localhost", "/").await;
    assert_eq!(kv(&root, "boot_id"), boot, "the same machine, not a boot");
    assert_eq!(
        d.get_ok("pg.localhost", "/counter").await.trim(),
        "counter=2"
    );
    let (s, snaps) = d
        .call(Method::GET, &format!("/vms/{id}/snapshots"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(snaps["snapshots"][0]["id"], sid);
    let (s, events) = d
        .call(Method::GET, &format!("/vms/{id}/events"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(events["events"][0]["kind"], "wake", "{events}");
}

#[tokio::test]
async fn a_database_outage_fails_calls_cleanly_and_they_work_again_after() {
    let mut pg = Postgres::start();
    let mut d = Daemon::start_with_env(vec![("HATCH_DATABASE_URL".into(), pg.url())]).await;
    let (id, boot) = d.boot_routed("outage").await;

    pg.stop();
    for (method, path, body) in [
        (Method::GET, "/vms".to_string(), None),
        (Method::GET, format!("/vms/{id}"), None),
        (
            Method::POST,
            "/vms".to_string(),
            Some(json!({ "name": "during" })),
        ),
        (
            Method::POST,
            "/routes".to_string(),
            Some(json!({ "hostname": "during.localhost", "vm_id": id })),
        ),
    ] {
        let (s, v) = d.call(method.clone(), &path, body).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{method} {path}: {v}");
        assert_eq!(v["error"]["code"], "state_store_unavailable", "{v}");
    }
    // The proxy serves running VMs from memory: the outage does not reach them.
    let root = d.get_ok("outage.localhost", "/").await;
    assert_eq!(kv(&root, "boot_id"), boot);

    pg.resume();
    let (s, list) = d.call(Method::GET, "/vms", None).await;
    assert_eq!(s, StatusCode::OK, "{list}");
    let names: Vec<&str> = list["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["outage"], "the refused create left nothing");
    let (s, routes) = d.call(Method::GET, "/routes", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(routes["routes"].as_array().unwrap().len(), 1, "{routes}");
    assert_eq!(d.vm(&id).await["state"], "running");
    // And changes work again.
    d.create_route("after.localhost", &id).await;
    assert_eq!(kv(&d.get_ok("after.localhost", "/").await, "boot_id"), boot);
    d.kill_daemon();
}
