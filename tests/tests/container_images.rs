//! A user's own app as a container image: an OCI archive (and a
//! docker-save archive of the same content) built here from busybox and a
//! small script, imported through the API, booted, reached through the
//! proxy, suspended and woken with its state; bad archives get a 4xx.

#![allow(clippy::unwrap_used)]

use hatch_e2e::*;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const START: &str = "#!/bin/sh\n\
if [ \"$1\" = exit ]; then echo \"exiting with $2\"; exit \"$2\"; fi\n\
echo \"greeting=$GREETING\" > /www/info.txt\n\
echo \"pwd=$(pwd)\" >> /www/info.txt\n\
echo \"user=$(id -u)\" >> /www/info.txt\n\
echo \"app starting\"\n\
exec httpd -f -p 8000 -h /www\n";

const COUNTER: &str = "#!/bin/sh\n\
n=$(cat /dev/shm/n 2>/dev/null || echo 0)\n\
n=$((n+1))\n\
echo $n > /dev/shm/n\n\
printf 'Content-Type: text/plain\\r\\n\\r\\ncounter=%s\\nboot_id=%s\\n' \"$n\" \"$(cat /proc/sys/kernel/random/boot_id)\"\n";

fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn append(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    b.append_data(&mut h, path, data).unwrap();
}

fn dir(b: &mut tar::Builder<Vec<u8>>, path: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(0);
    h.set_mode(0o755);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    b.append_data(&mut h, path, &[][..]).unwrap();
}

fn link(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    b.append_link(&mut h, path, target).unwrap();
}

/// Two layers: busybox with its applets, then the app.
fn layers() -> Vec<Vec<u8>> {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static at /bin/busybox");
    let mut base = tar::Builder::new(Vec::new());
    dir(&mut base, "bin");
    append(&mut base, "bin/busybox", &busybox, 0o755);
    for applet in [
        "sh", "httpd", "cat", "echo", "id", "printf", "pwd", "hostname",
    ] {
        link(&mut base, &format!("bin/{applet}"), "busybox");
    }
    dir(&mut base, "etc");
    append(
        &mut base,
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\n",
        0o644,
    );
    let mut app = tar::Builder::new(Vec::new());
    dir(&mut app, "app");
    append(&mut app, "app/start.sh", START.as_bytes(), 0o755);
    dir(&mut app, "www");
    dir(&mut app, "www/cgi-bin");
    append(&mut app, "www/cgi-bin/counter", COUNTER.as_bytes(), 0o755);
    vec![base.into_inner().unwrap(), app.into_inner().unwrap()]
}

fn config(arch: &str, layers: &[Vec<u8>]) -> Vec<u8> {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", sha256(l)))
        .collect();
    serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Entrypoint": ["/app/start.sh"],
            "Env": ["PATH=/bin", "GREETING=hello from the image"],
            "WorkingDir": "/app",
            "ExposedPorts": {"8000/tcp": {}}
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    }))
    .unwrap()
}

fn outer(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        append(&mut b, name, data, 0o644);
    }
    b.into_inner().unwrap()
}

fn descriptor(media: &str, data: &[u8]) -> Value {
    json!({"mediaType": media, "digest": format!("sha256:{}", sha256(data)), "size": data.len()})
}

/// The files of an OCI image layout archive.
fn oci_files(arch: &str) -> Vec<(String, Vec<u8>)> {
    let layers = layers();
    let cfg = config(arch, &layers);
    let mut files = vec![(
        "oci-layout".to_string(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    )];
    let mut descs = Vec::new();
    for l in &layers {
        descs.push(descriptor("application/vnd.oci.image.layer.v1.tar", l));
        files.push((format!("blobs/sha256/{}", sha256(l)), l.clone()));
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "config": descriptor("application/vnd.oci.image.config.v1+json", &cfg),
        "layers": descs,
    }))
    .unwrap();
    files.push((format!("blobs/sha256/{}", sha256(&cfg)), cfg));
    files.push((
        format!("blobs/sha256/{}", sha256(&manifest)),
        manifest.clone(),
    ));
    let index = json!({"schemaVersion": 2, "manifests": [
        descriptor("application/vnd.oci.image.manifest.v1+json", &manifest)]});
    files.push(("index.json".into(), serde_json::to_vec(&index).unwrap()));
    files
}

fn docker_save() -> Vec<u8> {
    let layers = layers();
    let cfg = config("amd64", &layers);
    let cfg_name = format!("{}.json", sha256(&cfg));
    let mut files = vec![(cfg_name.clone(), cfg)];
    let mut names = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        names.push(format!("l{i}/layer.tar"));
        files.push((format!("l{i}/layer.tar"), l.clone()));
    }
    let manifest = json!([{"Config": cfg_name, "RepoTags": ["web:latest"], "Layers": names}]);
    files.push((
        "manifest.json".into(),
        serde_json::to_vec(&manifest).unwrap(),
    ));
    outer(&files)
}

async fn import(d: &Daemon, name: &str, archive: Vec<u8>) -> (StatusCode, Value) {
    let resp = reqwest::Client::new()
        .post(d.api_url(&format!("/images?name={name}")))
        .bearer_auth(KEY)
        .body(archive)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn boot(d: &Daemon, image: &str, host: &str) -> String {
    let vm = d.create_vm(json!({ "name": image, "image": image })).await;
    let id = vm["id"].as_str().unwrap().to_string();
    d.wait_state(&id, "running").await;
    let route = d.create_route(host, &id).await;
    assert_eq!(route["port"], 8000, "the image's exposed port: {route}");
    d.wait_http(host, "/info.txt").await;
    id
}

#[tokio::test]
async fn an_imported_image_runs_its_app_suspends_and_wakes() {
    let garage = Garage::start().await;
    let mut env = garage.env();
    env.push(("HATCH_FAULTS".into(), "image.uploaded@flaky=fail:1".into()));
    let d = Daemon::start_with_env(env).await;

    // An import whose upload to S3 fails leaves nothing; the next works.
    let (s, e) = import(&d, "flaky", outer(&oci_files("amd64"))).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("image_unavailable")),
        "{e}"
    );
    let (_, list) = d.call(Method::GET, "/images", None).await;
    assert!(
        !list.to_string().contains("flaky"),
        "nothing recorded: {list}"
    );
    assert!(!d.data_dir.path().join("images/flaky").exists());
    let (s, image) = import(&d, "flaky", outer(&oci_files("amd64"))).await;
    assert_eq!(s, StatusCode::CREATED, "{image}");

    let (s, image) = import(&d, "web", outer(&oci_files("amd64"))).await;
    assert_eq!(s, StatusCode::CREATED, "{image}");
    assert_eq!(image["kind"], "container");
    assert_eq!(image["app"]["exposed_ports"], json!([8000]));
    let (_, list) = d.call(Method::GET, "/images", None).await;
    assert!(
        list["images"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "web"),
        "{list}"
    );

    let id = boot(&d, "web", "web.localhost").await;
    let info = d.get_ok("web.localhost", "/info.txt").await;
    assert_eq!(kv(&info, "greeting"), "hello from the image");
    assert_eq!(kv(&info, "pwd"), "/app");
    assert_eq!(kv(&info, "user"), "0");
    let first = d.get_ok("web.localhost", "/cgi-bin/counter").await;
    assert_eq!(kv(&first, "counter"), "1");
    let boot_id = kv(&first, "boot_id");
    assert!(
        d.console(&id).contains("app starting"),
        "the app's output is the VM's log"
    );

    // Exec runs where the app runs: its root, env, working dir and user.
    let (s, r) = d
        .call(
            Method::POST,
            &format!("/vms/{id}/exec"),
            Some(json!({"cmd": ["sh", "-c", "echo $GREETING; pwd; id -u; hostname; cat /dev/shm/n"]})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(
        r["stdout"], "hello from the image\n/app\n0\nweb\n1\n",
        "{r}"
    );
    // A program the image lacks: a clear 422, and the agent (PID 1 reaps
    // every process here) goes on serving.
    for _ in 0..3 {
        let (s, e) = d
            .call(
                Method::POST,
                &format!("/vms/{id}/exec"),
                Some(json!({"cmd": ["bash"]})),
            )
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    }
    let (s, r) = d
        .call(
            Method::POST,
            &format!("/vms/{id}/exec"),
            Some(json!({"cmd": ["id", "-u"]})),
        )
        .await;
    assert_eq!(
        (s, r["stdout"].as_str()),
        (StatusCode::OK, Some("0\n")),
        "{r}"
    );

    // Suspended to S3 and woken from S3 alone by a request: same boot,
    // counter goes on.
    let sid = d.snapshot(&id, true).await;
    d.wait_snapshot(&id, &sid, "ready").await;
    d.wait_state(&id, "snapshotted").await;
    d.wipe_local_snapshots(&id);
    let woken = d.get_ok("web.localhost", "/cgi-bin/counter").await;
    assert_eq!(
        (kv(&woken, "counter"), kv(&woken, "boot_id")),
        ("2".to_string(), boot_id)
    );
    // A connection opened after the wake, and an exec, work.
    let (s, r) = d
        .call(
            Method::POST,
            &format!("/vms/{id}/exec"),
            Some(json!({"cmd": ["cat", "/dev/shm/n"]})),
        )
        .await;
    assert_eq!(
        (s, r["stdout"].as_str()),
        (StatusCode::OK, Some("2\n")),
        "{r}"
    );

    // Per VM: env on top of the image's, and cmd replacing its Cmd.
    let vm = d
        .create_vm(
            json!({"name": "web-env", "image": "web", "env": {"GREETING": "hello from the vm"}}),
        )
        .await;
    assert_eq!(vm["env"]["GREETING"], "hello from the vm", "{vm}");
    let env_id = vm["id"].as_str().unwrap().to_string();
    d.wait_state(&env_id, "running").await;
    d.create_route("env.localhost", &env_id).await;
    let info = d.wait_http("env.localhost", "/info.txt").await;
    assert_eq!(kv(&info, "greeting"), "hello from the vm");
    // The app exits: the VM stops and says why; with a restart policy it
    // is restarted first, as many times as allowed.
    let vm = d
        .create_vm(
            json!({"name": "quitter", "image": "web", "cmd": ["exit", "3"],
                          "restart": {"policy": "on-failure", "max_retries": 2}}),
        )
        .await;
    let quitter = vm["id"].as_str().unwrap().to_string();
    let stopped = d.wait_state(&quitter, "stopped").await;
    assert_eq!(
        stopped["state_reason"], "the app exited with status 3; the VM powered off",
        "{stopped}"
    );
    let console = d.console(&quitter);
    assert_eq!(console.matches("exiting with 3").count(), 3, "{console}");
    assert!(console.contains("(restart 2)"), "{console}");
    // Settings for images without an app, or too large, are refused.
    for body in [
        json!({"image": "default", "env": {"A": "b"}}),
        json!({"image": "web", "env": {"A": "x".repeat(2000)}}),
        json!({"image": "web", "env": {"not valid": "b"}}),
        json!({"image": "web", "restart": {"policy": "sometimes"}}),
    ] {
        let (s, e) = d.call(Method::POST, "/vms", Some(body.clone())).await;
        assert!(
            s == StatusCode::UNPROCESSABLE_ENTITY || s == StatusCode::BAD_REQUEST,
            "{body}: {s} {e}"
        );
    }

    // In use: not deletable.
    let (s, err) = d.call(Method::DELETE, "/images/web", None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{err}");

    // The same content saved by docker works too.
    let (s, image) = import(&d, "web-docker", docker_save()).await;
    assert_eq!(s, StatusCode::CREATED, "{image}");
    boot(&d, "web-docker", "docker.localhost").await;
    let info = d.get_ok("docker.localhost", "/info.txt").await;
    assert_eq!(kv(&info, "greeting"), "hello from the image");
}

#[tokio::test]
async fn bad_archives_are_refused_clearly_and_leave_nothing() {
    let d = Daemon::start().await;
    let good = oci_files("amd64");

    let is_layer =
        |(name, data): &(String, Vec<u8>)| name.starts_with("blobs/") && data.len() > 100_000;
    let mut missing = good.clone();
    let i = missing.iter().position(is_layer).unwrap();
    missing.remove(i);
    let (s, e) = import(&d, "missing", outer(&missing)).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_request")),
        "{e}"
    );
    assert!(
        e["error"]["message"].as_str().unwrap().contains("missing"),
        "{e}"
    );

    let mut tampered = good.clone();
    let i = tampered.iter().position(is_layer).unwrap();
    tampered[i].1[600] ^= 1;
    let (s, e) = import(&d, "tampered", outer(&tampered)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("digest"),
        "{e}"
    );

    let (s, e) = import(&d, "arm", outer(&oci_files("arm64"))).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("arm64"),
        "{e}"
    );

    let (s, e) = import(&d, "Bad Name", outer(&good)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");

    let (_, list) = d.call(Method::GET, "/images", None).await;
    let names: Vec<&str> = list["images"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert!(names.contains(&"default"), "{names:?}");
    for refused in ["missing", "tampered", "arm"] {
        assert!(!names.contains(&refused), "{names:?}");
    }
    // Nothing left in the daemon's images dir: no image, upload or staging.
    let left: Vec<_> = std::fs::read_dir(d.data_dir.path().join("images"))
        .map(|entries| entries.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

fn image_in<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
}

#[tokio::test]
async fn an_image_imported_on_one_node_runs_on_every_node() {
    let pg = Postgres::start();
    let garage = Garage::start().await;
    let n1 = Daemon::cluster_node(&pg, &garage, "n1", &[]).await;
    // n2's first fetch of the image fails (S3 lost meanwhile).
    let n2 = Daemon::cluster_node(
        &pg,
        &garage,
        "n2",
        &[("HATCH_FAULTS", "image.fetched@web=fail:1")],
    )
    .await;
    // n3's first fetch of the image is cut short by a crash.
    let mut n3 = Daemon::cluster_node(
        &pg,
        &garage,
        "n3",
        &[("HATCH_FAULTS", "image.fetched@web=crash")],
    )
    .await;

    let (s, image) = import(&n1, "web", outer(&oci_files("amd64"))).await;
    assert_eq!(s, StatusCode::CREATED, "{image}");
    // Every node lists it, as the cluster's; only n1 has it yet.
    let (_, list) = n2.call(Method::GET, "/images", None).await;
    let web = image_in(&list, "web").expect("n2 lists n1's import");
    assert_eq!(
        (
            web["kind"].as_str(),
            web["node"].as_str(),
            web["stored"].as_bool(),
            web["on_this_node"].as_bool()
        ),
        (Some("container"), Some("n1"), Some(true), Some(false)),
        "{web}"
    );
    assert_eq!(web["app"]["exposed_ports"], json!([8000]));
    assert!(web["stored_bytes"].as_u64().unwrap() > 1 << 20, "{web}");
    // Its name is taken on every node.
    let (s, e) = import(&n2, "web", docker_save()).await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");

    // A VM of it on n1, routed through n2 (which has no copy: the route
    // still gets the image's port), then moved to n2: n2 fetches the image
    // and restores the VM, its state kept.
    let vm = n1.create_vm(json!({"name": "mover", "image": "web"})).await;
    let id = vm["id"].as_str().unwrap().to_string();
    n1.wait_state(&id, "running").await;
    let route = n2.create_route("web.localhost", &id).await;
    assert_eq!(route["port"], 8000, "{route}");
    n1.wait_http("web.localhost", "/info.txt").await;
    let first = n2.get_ok("web.localhost", "/cgi-bin/counter").await;
    assert_eq!(kv(&first, "counter"), "1");
    let (s, moved) = n1
        .call(
            Method::POST,
            &format!("/vms/{id}/move"),
            Some(json!({ "to": "n2" })),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{moved}");
    // The first wake fails on the image: the VM stays suspended, as
    // restorable as before, and says why; the next request wakes it.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let failed = loop {
        let vm = n2.vm(&id).await;
        if vm["state_reason"]
            .as_str()
            .is_some_and(|r| r.contains("cannot be fetched"))
        {
            break vm;
        }
        assert!(tokio::time::Instant::now() < deadline, "{vm}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(failed["state"], "snapshotted", "{failed}");
    assert_eq!(failed["node"], "n2", "{failed}");
    let after = n1.get_ok("web.localhost", "/cgi-bin/counter").await;
    assert_eq!(
        (kv(&after, "counter"), kv(&after, "boot_id")),
        ("2".to_string(), kv(&first, "boot_id"))
    );
    let (_, list) = n2.call(Method::GET, "/images", None).await;
    assert_eq!(image_in(&list, "web").unwrap()["on_this_node"], true);
    // An exec over the WebSocket, asked of n1, runs on n2 (the upgrade is
    // forwarded and spliced).
    let (out, _, end) = exec_ws(
        &n1,
        &id,
        json!({"cmd": ["sh", "-c", "cat; cat /dev/shm/n; hostname"]}),
        b"through n1\n",
    )
    .await;
    assert_eq!(out, "through n1\n2\nmover\n", "{end}");
    assert_eq!(end["exit_code"], 0, "{end}");

    // Booting it on n3: the first fetch is cut short by a crash, which
    // leaves no image behind; after a restart the fetch completes.
    let images3 = n3.data_dir.path().join("images");
    let crashed = n3
        .http
        .post(n3.api_url("/vms"))
        .bearer_auth(KEY)
        .json(&json!({"name": "b", "image": "web"}))
        .send()
        .await;
    assert!(crashed.is_err(), "the daemon died answering: {crashed:?}");
    n3.wait_for_crash().await;
    let leftovers: Vec<String> = std::fs::read_dir(&images3)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !leftovers.iter().any(|n| n == "web")
            && leftovers.iter().any(|n| n.starts_with(".fetch-web")),
        "a partial fetch, not an image: {leftovers:?}"
    );
    n3.set_env("HATCH_FAULTS", None);
    n3.start_again().await;
    assert!(
        !std::fs::read_dir(&images3).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with('.')),
        "the partial fetch is removed at start"
    );
    let vm = n3
        .create_vm(json!({"name": "b", "image": "web", "env": {"GREETING": "hi from n3"}}))
        .await;
    let b = vm["id"].as_str().unwrap().to_string();
    n3.wait_state(&b, "running").await;
    n3.create_route("b.localhost", &b).await;
    let info = n3.wait_http("b.localhost", "/info.txt").await;
    assert_eq!(kv(&info, "greeting"), "hi from n3");

    // Not deletable while a VM of any node uses it.
    let (s, e) = n1.call(Method::DELETE, "/images/web", None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains(&b), "{e}");
    for (node, vm) in [(&n2, &id), (&n3, &b)] {
        let (s, e) = node.call(Method::DELETE, &format!("/vms/{vm}"), None).await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{e}");
    }
    let (s, e) = n2.call(Method::DELETE, "/images/web", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{e}");
    // Gone for the cluster: from every list, from S3, and n3's copy is no
    // longer used.
    let (_, list) = n1.call(Method::GET, "/images", None).await;
    assert!(image_in(&list, "web").is_none(), "{list}");
    let stored: Vec<_> = {
        use futures_util::TryStreamExt;
        garage
            .bucket()
            .list(Some(&object_store::path::Path::from("images")))
            .try_collect()
            .await
            .unwrap()
    };
    assert!(stored.is_empty(), "{stored:?}");
    let (s, e) = n3
        .call(Method::POST, "/vms", Some(json!({"image": "web"})))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");

    // Imported again under the same name (other content, a new import):
    // n3's old copy is stale and not listed as present there.
    let (s, image) = import(&n1, "web", docker_save()).await;
    assert_eq!(s, StatusCode::CREATED, "{image}");
    let (_, list) = n3.call(Method::GET, "/images", None).await;
    assert_eq!(image_in(&list, "web").unwrap()["on_this_node"], false);
}
