//! The API contract without booting VMs: auth, errors, validation, OpenAPI.

#![allow(clippy::unwrap_used)]

use hatch_e2e::{Daemon, KEY};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<none>")
}

#[tokio::test]
async fn healthz_is_open_and_everything_else_needs_the_key() {
    let d = Daemon::start().await;
    let r = d.http.get(d.api_url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    for path in ["/vms", "/routes", "/metrics", "/openapi.json", "/vms/vm-x"] {
        let r = d.http.get(d.api_url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path} without key");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let body: Value = r.json().await.unwrap();
        assert_eq!(error_code(&body), "unauthorized");

        let r = d
            .http
            .get(d.api_url(path))
            .bearer_auth(format!("{KEY}x"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::UNAUTHORIZED,
            "{path} with a wrong key"
        );
    }
    let (status, body) = d.call(Method::GET, "/vms", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({ "vms": [] }));
    // The key is stored hashed: it appears nowhere in the database file.
    let db = std::fs::read(d.data_dir.path().join("hatch.db")).unwrap();
    assert!(!db.windows(KEY.len()).any(|w| w == KEY.as_bytes()));
    assert!(!d.daemon_log().contains(KEY), "the key reached the log");
}

#[tokio::test]
async fn bad_input_is_rejected_with_clear_errors_and_changes_nothing() {
    let d = Daemon::start().await;
    let cases = [
        (
            json!({ "name": "web", "colour": "red" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown field",
        ),
        (
            json!({ "name": "Bad_Name" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid name",
        ),
        (
            json!({ "vcpus": 0 }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vcpus",
        ),
        (
            json!({ "vcpus": 4096 }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "vcpus",
        ),
        (
            json!({ "memory_mib": 16 }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "memory_mib",
        ),
        (
            json!({ "memory_mib": 1u64 << 40 }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "memory_mib",
        ),
        (
            json!({ "disk_mib": 1 }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "disk_mib",
        ),
        (
            json!({ "image": "nope" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown image",
        ),
        (
            json!({ "vcpus": "two" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid type",
        ),
    ];
    for (body, status, needle) in cases {
        let (got, answer) = d.call(Method::POST, "/vms", Some(body.clone())).await;
        assert_eq!(got, status, "{body} -> {answer}");
        assert_eq!(error_code(&answer), "invalid_request", "{answer}");
        let msg = answer["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(needle),
            "{body}: message {msg:?} lacks {needle:?}"
        );
    }
    let r = d
        .http
        .post(d.api_url("/vms"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&r.json().await.unwrap()), "bad_request");

    // Routes: unknown VM, bad host names, bad port.
    let (s, b) = d
        .call(
            Method::POST,
            "/routes",
            Some(json!({ "hostname": "a.localhost", "vm_id": "vm-nope" })),
        )
        .await;
    assert_eq!((s, error_code(&b)), (StatusCode::NOT_FOUND, "not_found"));
    for host in ["", "a b", "http://x", "a:80"] {
        let (s, b) = d
            .call(
                Method::POST,
                "/routes",
                Some(json!({ "hostname": host, "vm_id": "vm-nope" })),
            )
            .await;
        assert_eq!(
            (s, error_code(&b)),
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            "{host}"
        );
    }
    let (s, b) = d
        .call(
            Method::POST,
            "/routes",
            Some(json!({ "hostname": "a.localhost", "vm_id": "vm-nope", "port": 70000 })),
        )
        .await;
    assert_eq!(
        (s, error_code(&b)),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request")
    );

    // Nothing was created.
    assert_eq!(
        d.call(Method::GET, "/vms", None).await.1,
        json!({ "vms": [] })
    );
    assert_eq!(
        d.call(Method::GET, "/routes", None).await.1,
        json!({ "routes": [] })
    );
    let vm_dirs = std::fs::read_dir(d.data_dir.path().join("vms"))
        .map(|r| r.count())
        .unwrap_or(0);
    assert_eq!(vm_dirs, 0);
}

#[tokio::test]
async fn unknown_things_are_404_and_snapshots_need_storage() {
    let d = Daemon::start().await;
    for (method, path) in [
        (Method::GET, "/vms/vm-nope"),
        (Method::DELETE, "/vms/vm-nope"),
        (Method::POST, "/vms/vm-nope/start"),
        (Method::POST, "/vms/vm-nope/stop"),
        (Method::GET, "/routes/rt-nope"),
        (Method::DELETE, "/routes/rt-nope"),
        (Method::GET, "/no/such/endpoint"),
    ] {
        let (s, b) = d.call(method.clone(), path, None).await;
        assert_eq!(
            (s, error_code(&b)),
            (StatusCode::NOT_FOUND, "not_found"),
            "{method} {path}"
        );
    }
    // Unknown host on the proxy: 404 JSON.
    let (s, body) = d.proxy_get("nobody.localhost", "/").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error_code(&body), "not_found");
}

#[tokio::test]
async fn openapi_and_metrics_describe_the_service() {
    let d = Daemon::start().await;
    let (s, doc) = d.call(Method::GET, "/openapi.json", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/vms",
        "/vms/{id}",
        "/vms/{id}/start",
        "/vms/{id}/stop",
        "/routes",
        "/routes/{id}",
    ] {
        assert!(doc["paths"][path].is_object(), "openapi lacks {path}");
    }
    assert!(doc["components"]["schemas"]["Vm"].is_object());

    let text = d.metrics_text().await;
    assert!(text.contains("hatch_vms{state=\"running\"} 0"), "{text}");
    assert!(text.contains("hatch_boot_duration_seconds"), "{text}");
    assert!(
        text.contains("# TYPE hatch_proxy_requests counter"),
        "{text}"
    );
}

#[tokio::test]
async fn a_second_daemon_on_the_same_data_dir_is_refused() {
    let d = Daemon::start().await;
    let out = std::process::Command::new(hatch_e2e::hatch_bin())
        .args([
            "serve",
            "--api-addr",
            "127.0.0.1:0",
            "--proxy-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(d.data_dir.path())
        .env("HATCH_API_KEY", KEY)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another `hatch serve` is using data dir"),
        "{stderr}"
    );
    // The first daemon is unaffected.
    assert_eq!(d.call(Method::GET, "/vms", None).await.0, StatusCode::OK);
}

/// The served OpenAPI document validates (openapi-spec-validator, installed
/// by scripts/test.sh), names each operation once, and documents the error
/// answers every operation can give, with the error schema.
#[tokio::test]
async fn the_openapi_document_validates_and_documents_every_error() {
    let d = Daemon::start().await;
    let (s, doc) = d.call(Method::GET, "/openapi.json", None).await;
    assert_eq!(s, StatusCode::OK);
    let file = d.data_dir.path().join("openapi.json");
    std::fs::write(&file, serde_json::to_vec(&doc).unwrap()).unwrap();
    let validator = std::env::var_os("HATCH_OPENAPI_VALIDATOR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap())
                .join(".cache/hatch/openapi-venv/bin/openapi-spec-validator")
        });
    let out = std::process::Command::new(&validator)
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/test.sh)", validator.display()));
    assert!(
        out.status.success(),
        "invalid OpenAPI document:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let mut ids = std::collections::BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"].as_str().unwrap();
            assert!(ids.insert(id.to_string()), "duplicate operationId {id}");
            assert!(
                op["tags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|t| !t.as_str().unwrap().contains("::")),
                "{method} {path}: {op}"
            );
            let responses = op["responses"].as_object().unwrap();
            let mut must = vec!["401", "500"];
            if op.get("requestBody").is_some() {
                must.extend(["400", "422"]);
            }
            if path.contains('{') {
                must.push("404");
            }
            for status in must {
                assert!(
                    responses.contains_key(status),
                    "{method} {path} lacks {status}"
                );
            }
            for (status, r) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    assert_eq!(
                        r["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/ErrorBody",
                        "{method} {path} {status}"
                    );
                }
            }
        }
    }
    let create = &doc["components"]["schemas"]["CreateVm"]["properties"];
    assert!(create["name"]["pattern"].is_string(), "{create}");
    assert_eq!(create["vcpus"]["minimum"], 1);
    let route = &doc["components"]["schemas"]["CreateRoute"]["properties"];
    assert_eq!(route["port"]["maximum"], 65535);
}
