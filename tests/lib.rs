//! End-to-end test harness: starts the real `hatch serve` binary on free ports
//! with a fresh data directory, talks to its API and proxy over real HTTP, and
//! cleans up every QEMU it caused when dropped.
//!
//! Needs the default image built into `HATCH_TEST_IMAGES_DIR` (default
//! `~/.cache/hatch/images`); `scripts/test.sh` builds it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

pub mod postgres;
pub use postgres::Postgres;

pub const KEY: &str = "hatch_e2e_test_key_0123456789";

/// Longest wait for any condition: a TCG boot on a loaded 2-core machine.
pub const PATIENCE: Duration = Duration::from_secs(180);

pub fn hatch_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HATCH_BIN") {
        return p.into();
    }
    // Test binaries live in target/<profile>/deps; the hatch binary one up.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap()
    } else {
        dir
    };
    let bin = dir.join("hatch");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build --bin hatch` first",
        bin.display()
    );
    bin
}

pub fn images_dir() -> PathBuf {
    std::env::var_os("HATCH_TEST_IMAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/hatch/images")
        })
}

pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

pub struct Daemon {
    child: Option<Child>,
    pub data_dir: tempfile::TempDir,
    pub run_dir: PathBuf,
    pub api_addr: SocketAddr,
    pub proxy_addr: SocketAddr,
    pub http: reqwest::Client,
    extra_env: Vec<(String, String)>,
    /// Variables the harness sets by default but the next start must lack.
    removed_env: Vec<String>,
}

impl Daemon {
    pub async fn start() -> Daemon {
        Self::start_with_env(Vec::new()).await
    }

    pub async fn start_with_env(extra_env: Vec<(String, String)>) -> Daemon {
        let data_dir = tempfile::Builder::new()
            .prefix("hatch-e2e-")
            .tempdir()
            .unwrap();
        let run_dir = PathBuf::from("/dev/shm").join(data_dir.path().file_name().unwrap());
        let mut d = Daemon {
            child: None,
            data_dir,
            run_dir,
            api_addr: free_addr(),
            proxy_addr: free_addr(),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
            extra_env,
            removed_env: Vec::new(),
        };
        d.spawn().await;
        d
    }

    async fn spawn(&mut self) {
        // A port picked free may be taken (by a QEMU's forward, another
        // test) before the daemon binds it: pick new ones and try again.
        for _ in 0..5 {
            let log_len = self.daemon_log().len();
            if self.spawn_once().await {
                return;
            }
            let log = self.daemon_log();
            assert!(
                log[log_len..].contains("Address already in use"),
                "hatch serve exited:\n{log}"
            );
            self.api_addr = free_addr();
            self.proxy_addr = free_addr();
        }
        panic!("no free ports for the daemon:\n{}", self.daemon_log());
    }

    /// Start the daemon; false if it exited before answering.
    async fn spawn_once(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.path().join("daemon.log"))
            .unwrap();
        let mut cmd = Command::new(hatch_bin());
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .arg("--api-addr")
            .arg(self.api_addr.to_string())
            .arg("--proxy-addr")
            .arg(self.proxy_addr.to_string())
            .arg("--run-dir")
            .arg(&self.run_dir)
            // The data dir's own images dir stays empty: the default
            // image is found in the cache the set-up scripts build it in.
            .env("HATCH_IMAGE_CACHE_DIR", images_dir())
            .env("HATCH_API_KEY", KEY)
            // Tap networking (nftables tables, tap devices) only where a
            // test asks for it and cleans up after it (tests/network.rs).
            .env("HATCH_NETWORK", "user")
            // A suspended VM has no QEMU unless a test asks for standbys.
            .env("HATCH_STANDBY_QEMUS", "0")
            .env_remove("HATCH_S3_BUCKET")
            .env_remove("HATCH_S3_ACCESS_KEY_ID")
            .env_remove("HATCH_S3_SECRET_ACCESS_KEY")
            .env_remove("HATCH_DATABASE_URL")
            .env("HATCH_LOG", "info,hatch_proxy=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        for k in &self.removed_env {
            cmd.env_remove(k);
        }
        self.child = Some(cmd.spawn().unwrap());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let url = format!("http://{}/healthz", self.api_addr);
            if let Ok(r) = self.http.get(&url).send().await
                && r.status() == StatusCode::OK
            {
                return true;
            }
            if self.child.as_mut().unwrap().try_wait().unwrap().is_some() {
                self.child = None;
                return false;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "daemon did not come up:\n{}",
                self.daemon_log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.data_dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// The daemon's process id, while it runs.
    pub fn daemon_pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// SIGKILL the daemon (VMs keep running), as a crash would.
    pub fn kill_daemon(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start the daemon again on the same data dir and ports.
    pub async fn restart(&mut self) {
        self.kill_daemon();
        self.spawn().await;
    }

    pub fn api_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api_addr)
    }

    /// Call the API with the test key; returns status and JSON (Null if none).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, self.api_url(path))
            .bearer_auth(KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn create_vm(&self, body: Value) -> Value {
        let (status, vm) = self.call(Method::POST, "/vms", Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{vm}");
        vm
    }

    pub async fn vm(&self, id: &str) -> Value {
        let (status, vm) = self.call(Method::GET, &format!("/vms/{id}"), None).await;
        assert_eq!(status, StatusCode::OK, "{vm}");
        vm
    }

    /// Wait until the VM is in `state`; panics with the console log if it fails.
    pub async fn wait_state(&self, id: &str, state: &str) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let vm = self.vm(id).await;
            if vm["state"] == state {
                return vm;
            }
            if vm["state"] == "failed" && state != "failed" {
                panic!(
                    "vm failed: {vm}\nconsole:\n{}\ndaemon:\n{}",
                    self.console(id),
                    self.daemon_log()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "vm never became {state}: {vm}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn console(&self, id: &str) -> String {
        std::fs::read_to_string(
            self.data_dir
                .path()
                .join("vms")
                .join(id)
                .join("console.log"),
        )
        .unwrap_or_default()
    }

    pub async fn create_route(&self, host: &str, vm_id: &str) -> Value {
        let body = serde_json::json!({ "hostname": host, "vm_id": vm_id });
        let (status, route) = self.call(Method::POST, "/routes", Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{route}");
        route
    }

    /// GET through the proxy with the given Host header.
    pub async fn proxy_get(&self, host: &str, path: &str) -> (StatusCode, String) {
        let resp = self
            .http
            .get(format!("http://{}{path}", self.proxy_addr))
            .header("host", host)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.text().await.unwrap())
    }

    /// Wait until the guest app answers 200 through the proxy (it starts after
    /// the VM is `running`, once the guest kernel has booted).
    pub async fn wait_http(&self, host: &str, path: &str) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let (status, body) = self.proxy_get(host, path).await;
            if status == StatusCode::OK {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no 200 from {host}{path}: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Start a snapshot; returns its id.
    pub async fn snapshot(&self, vm: &str, stop: bool) -> String {
        let (s, snap) = self
            .call(
                Method::POST,
                &format!("/vms/{vm}/snapshot"),
                Some(serde_json::json!({ "stop": stop })),
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{snap}");
        assert_eq!(snap["status"], "pending");
        snap["id"].as_str().unwrap().to_string()
    }

    /// Wait until the snapshot has `status` (a failure panics unless awaited).
    pub async fn wait_snapshot(&self, vm: &str, sid: &str, status: &str) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let (s, snap) = self
                .call(Method::GET, &format!("/vms/{vm}/snapshots/{sid}"), None)
                .await;
            assert_eq!(s, StatusCode::OK, "{snap}");
            if snap["status"] == status {
                return snap;
            }
            if snap["status"] == "failed" {
                panic!("snapshot failed: {snap}\n{}", self.daemon_log());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "snapshot never {status}: {snap}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Ask for a restore and check it was accepted (202); do not wait.
    pub async fn start_restore(&self, vm: &str, body: Value) {
        let (s, v) = self
            .call(Method::POST, &format!("/vms/{vm}/restore"), Some(body))
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    }

    /// GET through the proxy, which must answer 200; returns the body.
    pub async fn get_ok(&self, host: &str, path: &str) -> String {
        let (s, body) = self.proxy_get(host, path).await;
        assert_eq!(s, StatusCode::OK, "{host}{path}: {body}");
        body
    }

    /// Create VM `name` routed at `<name>.localhost` and wait until its app
    /// answers; returns its id and boot id.
    pub async fn boot_routed(&self, name: &str) -> (String, String) {
        let id = self.create_vm(serde_json::json!({ "name": name })).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        self.wait_state(&id, "running").await;
        let host = format!("{name}.localhost");
        self.create_route(&host, &id).await;
        let boot = kv(&self.wait_http(&host, "/").await, "boot_id");
        (id, boot)
    }

    /// Ask for a restore (202) and wait until the VM is running again.
    pub async fn restore(&self, vm: &str, body: Value) {
        let (s, v) = self
            .call(Method::POST, &format!("/vms/{vm}/restore"), Some(body))
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        self.wait_state(vm, "running").await;
    }

    /// `GET /metrics` as text.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(self.api_url("/metrics"))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Overwrite the local copy of a snapshot's device state with garbage
    /// (a restore from it fails); returns the good bytes to put back.
    pub fn break_local_state(&self, sid: &str) -> Vec<u8> {
        let path = self.local_state_path(sid);
        let good = std::fs::read(&path).unwrap();
        std::fs::write(&path, b"not a QEMU migration stream").unwrap();
        good
    }

    pub fn repair_local_state(&self, sid: &str, good: Vec<u8>) {
        std::fs::write(self.local_state_path(sid), good).unwrap();
    }

    fn local_state_path(&self, sid: &str) -> PathBuf {
        self.data_dir
            .path()
            .join("snapshots")
            .join(sid)
            .join("state")
    }

    /// Remove every local copy of a suspended VM's snapshots and disk
    /// layers, so that a restore must come from S3 alone.
    pub fn wipe_local_snapshots(&self, vm: &str) {
        let _ = std::fs::remove_dir_all(self.data_dir.path().join("snapshots"));
        for entry in std::fs::read_dir(self.data_dir.path().join("vms").join(vm)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "qcow2") {
                std::fs::remove_file(path).unwrap();
            }
        }
    }

    /// PIDs of this daemon's lazy RAM servers (`hatch lazyram --spec
    /// <run dir>/…`).
    pub fn lazyram_pids(&self) -> Vec<i32> {
        let run_dir = self.run_dir.display().to_string();
        pids_whose_args(|args| {
            args.get(1).is_some_and(|a| a == "lazyram")
                && args.iter().any(|a| a.starts_with(&run_dir))
        })
    }

    /// Mount points under this daemon's run dir (lazy RAM FUSE mounts).
    pub fn lazy_mounts(&self) -> Vec<String> {
        let run_dir = self.run_dir.display().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&run_dir))
            .map(str::to_string)
            .collect()
    }

    /// PIDs of live QEMU processes of this daemon: every process whose
    /// command line names a socket in its run dir (pid files are the
    /// daemon's own bookkeeping and cannot be trusted to tell).
    pub fn qemu_pids(&self) -> Vec<i32> {
        let run_dir = self.run_dir.display().to_string();
        pids_whose_args(|args| {
            args.first().is_some_and(|a| a.contains("qemu-system"))
                && args.iter().any(|a| a.contains(&run_dir))
        })
        .into_iter()
        .filter(|pid| process_alive(*pid))
        .collect()
    }

    /// A node of a cluster sharing `pg` and `garage`, with a cluster
    /// address and the cluster's secrets; `extra` is added to its
    /// environment.
    pub async fn cluster_node(
        pg: &Postgres,
        garage: &Garage,
        name: &str,
        extra: &[(&str, &str)],
    ) -> Daemon {
        let mut env = garage.env();
        env.extend(
            [
                ("HATCH_DATABASE_URL", pg.url()),
                ("HATCH_NODE_NAME", name.to_string()),
                ("HATCH_CLUSTER_ADDR", free_addr().to_string()),
                (
                    "HATCH_CLUSTER_SECRET",
                    "cluster-secret-for-tests-0123".to_string(),
                ),
                (
                    "HATCH_SNAPSHOT_SECRET",
                    "snapshot-secret-for-tests-0123".to_string(),
                ),
                // Lost nodes are noticed in seconds, not the default 15.
                ("HATCH_NODE_DOWN_SECONDS", "3".to_string()),
            ]
            .map(|(k, v)| (k.to_string(), v)),
        );
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Daemon::start_with_env(env).await
    }

    /// Set (or with None, remove) an environment variable of the daemon
    /// for its next start.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.extra_env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.extra_env.push((key.to_string(), v.to_string()));
        }
    }

    /// Start the daemon without `key` in its environment from its next
    /// start on (also one the harness sets, like `HATCH_API_KEY`).
    pub fn remove_env(&mut self, key: &str) {
        self.extra_env.retain(|(k, _)| k != key);
        self.removed_env.push(key.to_string());
    }

    /// Start the daemon with `HATCH_FAULTS=fault` and wait until the fault
    /// has killed it (after `trigger` ran): then start it again without.
    pub async fn wait_for_crash(&mut self) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                assert!(
                    !status.success(),
                    "the daemon exited cleanly instead of crashing"
                );
                self.child = None;
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the fault never fired:\n{}",
                self.daemon_log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Start the daemon again (it is not running).
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "the daemon still runs");
        self.spawn().await;
    }
}

/// Run `request` over the exec WebSocket, sending `input` as stdin;
/// returns stdout, stderr and the final message.
pub async fn exec_ws(
    d: &Daemon,
    id: &str,
    request: Value,
    input: &[u8],
) -> (String, String, Value) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let mut req = format!("ws://{}/vms/{id}/exec/ws", d.api_addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send(Message::Text(request.to_string().into()))
        .await
        .unwrap();
    let mut msg = vec![0u8];
    msg.extend_from_slice(input);
    ws.send(Message::Binary(msg.into())).await.unwrap();
    ws.send(Message::Text(r#"{"eof":true}"#.into()))
        .await
        .unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some(m) = ws.next().await {
        match m.unwrap() {
            Message::Binary(b) => match b[0] {
                1 => out.extend_from_slice(&b[1..]),
                2 => err.extend_from_slice(&b[1..]),
                other => panic!("unknown stream {other}"),
            },
            Message::Text(t) => {
                return (
                    String::from_utf8(out).unwrap(),
                    String::from_utf8(err).unwrap(),
                    serde_json::from_str(&t).unwrap(),
                );
            }
            _ => {}
        }
    }
    panic!("the exec socket closed without an end message");
}

/// Parse `key=value` lines of the demo app.
pub fn kv(body: &str, key: &str) -> String {
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {body:?}"))
        .to_string()
}

/// PIDs of the processes whose arguments satisfy `wanted`.
fn pids_whose_args(wanted: impl Fn(&[String]) -> bool) -> Vec<i32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            wanted(&args)
        })
        .collect()
}

pub fn process_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

pub fn kill_pid(pid: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill_daemon();
        for pid in self.qemu_pids() {
            kill_pid(pid);
        }
        // A lazy RAM server would end on its own once its QEMU is gone, but
        // its mount would keep the run dir from being removed meanwhile.
        for pid in self.lazyram_pids() {
            kill_pid(pid);
        }
        for mount in self.lazy_mounts() {
            let _ = Command::new("umount").arg("-l").arg(&mount).status();
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
        if std::thread::panicking() {
            eprintln!("--- daemon log ---\n{}", self.daemon_log());
        }
    }
}

/// A single-node Garage (real S3) in a temporary directory, for one test.
pub struct Garage {
    child: Child,
    _dir: tempfile::TempDir,
    pub endpoint: String,
    pub key_id: String,
    pub secret: String,
    config: PathBuf,
}

pub fn garage_bin() -> PathBuf {
    std::env::var_os("HATCH_GARAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap())
                .join(".cache/hatch/garage-install/bin/garage")
        })
}

impl Garage {
    pub async fn start() -> Garage {
        let dir = tempfile::Builder::new()
            .prefix("hatch-garage-")
            .tempdir()
            .unwrap();
        let (rpc, s3, admin) = (free_addr(), free_addr(), free_addr());
        let config = dir.path().join("garage.toml");
        let secret: String = (0..32)
            .map(|i| format!("{:02x}", (i * 7 + 3) as u8))
            .collect();
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\nblock_size = \"4M\"\ncompression_level = \"none\"\nrpc_bind_addr = \"{rpc}\"\nrpc_public_addr = \"{rpc}\"\n\
                 rpc_secret = \"{secret}\"\n[s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n[admin]\napi_bind_addr = \"{admin}\"\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        let child = spawn_garage(&config, dir.path());
        let mut g = Garage {
            child,
            _dir: dir,
            endpoint: format!("http://{s3}"),
            key_id: String::new(),
            secret: String::new(),
            config,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let node = loop {
            let out = g.cli(&["node", "id", "-q"]);
            if let Some(id) = out
                .as_ref()
                .ok()
                .and_then(|s| s.split('@').next().map(str::to_string))
                && !id.trim().is_empty()
            {
                break id.trim().to_string();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "garage did not start: {out:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // A fresh node may refuse a step until the previous one has taken
        // effect; each step is retried until it succeeds.
        g.cli_retry(&["layout", "assign", "-z", "dc1", "-c", "1G", &node])
            .await;
        g.cli_retry(&["layout", "apply", "--version", "1"]).await;
        g.cli_retry(&["bucket", "create", "hatch"]).await;
        g.cli_retry(&["key", "create", "hatch"]).await;
        g.cli_retry(&[
            "bucket", "allow", "--read", "--write", "--owner", "hatch", "--key", "hatch",
        ])
        .await;
        let info = g
            .cli_retry(&["key", "info", "hatch", "--show-secret"])
            .await;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
                .unwrap_or_else(|| panic!("no {name} in {info}"))
        };
        g.key_id = field("Key ID:");
        g.secret = field("Secret key:");
        g
    }

    /// Take S3 down (as an outage would).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Bring S3 back with the same data, and wait until it answers.
    pub async fn restart(&mut self) {
        self.stop();
        self.child = spawn_garage(&self.config, self.config.parent().unwrap());
        let addr = self.endpoint.trim_start_matches("http://").to_string();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(&addr).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "garage did not come back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn cli_retry(&self, args: &[&str]) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match self.cli(args) {
                Ok(out) => return out,
                Err(e) => assert!(
                    tokio::time::Instant::now() < deadline,
                    "garage {args:?} failed: {e}\n--- garage log ---\n{}",
                    std::fs::read_to_string(self.config.with_file_name("garage.log"))
                        .unwrap_or_default()
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(garage_bin())
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// The bucket, for tests that read or tamper with what is in it.
    pub fn bucket(&self) -> std::sync::Arc<dyn object_store::ObjectStore> {
        std::sync::Arc::new(
            object_store::aws::AmazonS3Builder::new()
                .with_endpoint(&self.endpoint)
                .with_allow_http(true)
                .with_bucket_name("hatch")
                .with_region("garage")
                .with_access_key_id(&self.key_id)
                .with_secret_access_key(&self.secret)
                .with_virtual_hosted_style_request(false)
                .build()
                .unwrap(),
        )
    }

    /// The manifest S3 holds for snapshot `sid` of VM `vm` (the body of
    /// its signed envelope).
    pub async fn manifest(&self, vm: &str, sid: &str) -> Value {
        use object_store::ObjectStoreExt;
        let key = object_store::path::Path::from(format!("manifests/{vm}/{sid}.json"));
        let object = self
            .bucket()
            .get(&key)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let signed: Value = serde_json::from_slice(&object).unwrap();
        signed["manifest"].clone()
    }

    /// Overwrite chunk `id` in S3 with valid zstd whose content is not
    /// what the chunk's name promises.
    pub async fn corrupt_chunk(&self, id: &str) {
        use object_store::ObjectStoreExt;
        let garbage = zstd::bulk::compress(&[0x5a; 4096], 1).unwrap();
        let key = object_store::path::Path::from(format!("chunks/{}/{id}", &id[..2]));
        self.bucket()
            .put(&key, bytes::Bytes::from(garbage).into())
            .await
            .unwrap();
    }

    /// The daemon's S3 settings for this Garage.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("HATCH_S3_ENDPOINT", self.endpoint.as_str()),
            ("HATCH_S3_BUCKET", "hatch"),
            ("HATCH_S3_REGION", "garage"),
            ("HATCH_S3_ACCESS_KEY_ID", self.key_id.as_str()),
            ("HATCH_S3_SECRET_ACCESS_KEY", self.secret.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_garage(config: &Path, dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("garage.log"))
        .unwrap();
    Command::new(garage_bin())
        .arg("-c")
        .arg(config)
        .arg("server")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("garage not installed: run scripts/test.sh")
}

/// Assert that the guest's `time=` (from the demo app's `/`) is within
/// `tolerance` seconds of the host's clock.
pub fn assert_guest_clock(root: &str, tolerance: f64) {
    let guest: f64 = kv(root, "time").parse().unwrap();
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (host - guest).abs() < tolerance,
        "guest clock {guest} is off host clock {host} by more than {tolerance}s"
    );
}
