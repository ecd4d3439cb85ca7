//! A small client for the Hatch API: bearer auth and JSON errors made readable.

use anyhow::{Context, bail};
use clap::Args;
use reqwest::{Method, StatusCode};
use serde_json::Value;

#[derive(Args, Clone)]
pub struct ApiArgs {
    /// Address of the Hatch API.
    #[arg(
        long,
        global = true,
        env = "HATCH_API",
        default_value = "http://127.0.0.1:7070"
    )]
    pub api: String,
    /// API key (printed by `hatch serve` on first start).
    #[arg(long, global = true, env = "HATCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Client {
    pub fn new(args: &ApiArgs) -> anyhow::Result<Client> {
        let Some(key) = args.api_key.clone() else {
            bail!(
                "no API key: pass --api-key or set HATCH_API_KEY (`hatch serve` printed one on first start)"
            );
        };
        Ok(Client {
            http: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(5))
                .timeout(std::time::Duration::from_secs(120))
                .build()
                .context("building the HTTP client")?,
            base: args.api.trim_end_matches('/').to_string(),
            key,
        })
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<reqwest::Response> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.key);
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                anyhow::anyhow!(
                    "cannot reach the Hatch API at {}: is `hatch serve` running?",
                    self.base
                )
            } else {
                anyhow::Error::new(e).context(format!("{method} {url}"))
            }
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let parsed: Option<Value> = serde_json::from_str(&text).ok();
        match parsed.as_ref().and_then(|v| v.get("error")) {
            Some(err) => bail!(
                "{} ({}, HTTP {})",
                err["message"].as_str().unwrap_or("request failed"),
                err["code"].as_str().unwrap_or("error"),
                status.as_u16()
            ),
            None if status == StatusCode::NOT_FOUND => bail!("not found: {path}"),
            None => bail!("HTTP {status}: {text}"),
        }
    }

    pub async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let resp = self.request(method, path, body).await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        resp.json().await.context("decoding the API's answer")
    }

    /// Accept a VM id or a VM name.
    pub async fn vm_id(&self, id_or_name: &str) -> anyhow::Result<String> {
        if id_or_name.starts_with("vm-") {
            return Ok(id_or_name.to_string());
        }
        let list = self.json(Method::GET, "/vms", None).await?;
        list["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|vm| vm["name"] == id_or_name)
            .and_then(|vm| vm["id"].as_str())
            .map(String::from)
            .with_context(|| format!("no vm with id or name '{id_or_name}'"))
    }
}
