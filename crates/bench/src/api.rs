//! The few API calls the benchmark makes, and its waits.

use std::time::Duration;

use anyhow::{Context, bail};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(300);
/// Poll interval: short, since the waits are what is being measured.
const POLL: Duration = Duration::from_millis(5);

pub struct Api {
    http: reqwest::Client,
    base: String,
    key: String,
    proxy: String,
}

impl Api {
    pub fn new(base: &str, key: &str, proxy: &str) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_string(),
            key: key.to_string(),
            proxy: proxy.to_string(),
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("{method} {path}: {status}: {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// `POST /images?name=` with `archive` as the body.
    pub async fn import_image(&self, name: &str, archive: Vec<u8>) -> anyhow::Result<()> {
        let resp = self
            .http
            .post(format!("{}/images?name={name}", self.base))
            .bearer_auth(&self.key)
            .body(archive)
            .send()
            .await
            .context("POST /images")?;
        if !resp.status().is_success() {
            bail!("POST /images: {}: {}", resp.status(), resp.text().await?);
        }
        Ok(())
    }

    pub async fn delete_image(&self, name: &str) -> anyhow::Result<()> {
        self.call(Method::DELETE, &format!("/images/{name}"), None)
            .await
            .map(|_| ())
    }

    pub async fn create_vm(&self, body: Value) -> anyhow::Result<String> {
        let vm = self.call(Method::POST, "/vms", Some(body)).await?;
        let id = vm["id"].as_str().context("no vm id")?.to_string();
        self.wait_state(&id, "running").await?;
        Ok(id)
    }

    pub async fn delete_vm(&self, id: &str) -> anyhow::Result<()> {
        self.call(Method::DELETE, &format!("/vms/{id}"), None)
            .await?;
        Ok(())
    }

    pub async fn route(&self, host: &str, vm: &str) -> anyhow::Result<()> {
        self.call(
            Method::POST,
            "/routes",
            Some(json!({ "hostname": host, "vm_id": vm })),
        )
        .await?;
        Ok(())
    }

    pub async fn wait_state(&self, id: &str, state: &str) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let vm = self.call(Method::GET, &format!("/vms/{id}"), None).await?;
            if vm["state"] == state {
                return Ok(vm);
            }
            if vm["state"] == "failed" || tokio::time::Instant::now() > deadline {
                bail!("vm {id} did not become {state}: {vm}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Wait for the first 200 through the proxy.
    pub async fn wait_http(&self, host: &str) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let r = self
                .http
                .get(format!("http://{}/", self.proxy))
                .header("host", host)
                .send()
                .await;
            if matches!(&r, Ok(r) if r.status() == StatusCode::OK) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{host} never answered");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub async fn wait_console(&self, id: &str, needle: &str) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let resp = self
                .http
                .get(format!("{}/vms/{id}/logs", self.base))
                .bearer_auth(&self.key)
                .send()
                .await?;
            if resp.text().await?.contains(needle) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("console of {id} never showed {needle:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Take a snapshot, asking again while the VM is busy with another
    /// operation (a disk compaction that a wake started, as a client would).
    pub async fn snapshot(&self, vm: &str, stop: bool) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let asked = self
                .call(
                    Method::POST,
                    &format!("/vms/{vm}/snapshot"),
                    Some(json!({ "stop": stop })),
                )
                .await;
            match asked {
                Ok(s) => return Ok(s["id"].as_str().context("no snapshot id")?.to_string()),
                Err(e)
                    if e.to_string().contains("409 Conflict")
                        && e.to_string().contains("is busy")
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(POLL).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub async fn wait_snapshot(&self, vm: &str, sid: &str) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let s = self
                .call(Method::GET, &format!("/vms/{vm}/snapshots/{sid}"), None)
                .await?;
            match s["status"].as_str() {
                Some("ready") => return Ok(s),
                Some("failed") => bail!("snapshot failed: {s}"),
                _ if tokio::time::Instant::now() > deadline => bail!("snapshot stuck: {s}"),
                _ => tokio::time::sleep(POLL).await,
            }
        }
    }

    pub async fn call_json(
        &self,
        method: Method,
        path: &str,
        body: Value,
    ) -> anyhow::Result<Value> {
        self.call(method, path, Some(body)).await
    }

    /// The host port forwarded to `guest` of a running VM.
    pub async fn guest_port(&self, vm: &str, guest: u16) -> anyhow::Result<u16> {
        let v = self.call(Method::GET, &format!("/vms/{vm}"), None).await?;
        v["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["guest"] == guest)
            .and_then(|p| p["host"].as_u64())
            .and_then(|p| u16::try_from(p).ok())
            .with_context(|| format!("vm {vm} forwards no port {guest}: {v}"))
    }

    pub async fn newest_snapshot(&self, vm: &str) -> anyhow::Result<Value> {
        let list = self
            .call(Method::GET, &format!("/vms/{vm}/snapshots"), None)
            .await?;
        Ok(list["snapshots"][0].clone())
    }

    /// One GET through the proxy; its status.
    pub async fn proxy_get(&self, host: &str, path: &str) -> anyhow::Result<u16> {
        Ok(self.proxy_get_body(host, path).await?.0)
    }

    /// One GET through the proxy; its status and body.
    pub async fn proxy_get_body(&self, host: &str, path: &str) -> anyhow::Result<(u16, String)> {
        let resp = self
            .http
            .get(format!("http://{}{path}", self.proxy))
            .header("host", host)
            .send()
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await?))
    }

    /// The VM's events (wakes, idle suspends).
    pub async fn events(&self, vm: &str) -> anyhow::Result<Vec<Value>> {
        let v = self
            .call(Method::GET, &format!("/vms/{vm}/events"), None)
            .await?;
        Ok(v["events"].as_array().cloned().unwrap_or_default())
    }

    /// A counter's or gauge's value on `/metrics` (0 when not shown).
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .bearer_auth(&self.key)
            .send()
            .await
            .context("GET /metrics")?
            .error_for_status()?
            .text()
            .await?;
        Ok(text
            .lines()
            .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .find_map(|v| v.trim().parse().ok())
            .unwrap_or(0.0))
    }

    /// Wait, at most `limit`, until the daemon holds a standby QEMU (started
    /// after a suspended VM's upload, for its next wake); whether it does.
    /// A wake right after the upload would otherwise race its start, which
    /// a wake after any real idle period never does.
    pub async fn await_standby(&self, limit: Duration) -> anyhow::Result<bool> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.metric("hatch_standby_qemus").await? >= 1.0 {
                return Ok(true);
            }
            if tokio::time::Instant::now() > deadline {
                return Ok(false);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub async fn restore(&self, vm: &str) -> anyhow::Result<()> {
        self.call(Method::POST, &format!("/vms/{vm}/restore"), Some(json!({})))
            .await?;
        Ok(())
    }
}
