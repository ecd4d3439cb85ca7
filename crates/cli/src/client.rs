//! A small client for the Hatch API: bearer auth and JSON errors made readable.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use reqwest::{Method, StatusCode};
use serde_json::Value;

#[derive(Args, Clone)]
pub struct ApiArgs {
    /// Address of the Hatch API; `http://` is assumed when no scheme is given.
    #[arg(
        long,
        global = true,
        env = "HATCH_API",
        default_value = "http://127.0.0.1:7070"
    )]
    pub api: String,
    /// API key [default: read from $HATCH_DATA_DIR/api-key, else
    /// ~/.local/share/hatch/api-key, the file scripts/up.sh writes].
    #[arg(long, global = true, env = "HATCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print JSON instead of tables (one JSON object per line where output streams).
    #[arg(long, global = true)]
    pub json: bool,
}

/// An error answer of the API, kept structured so that callers can react
/// to a status (e.g. 404 when a followed VM is deleted).
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}, HTTP {})",
            self.message,
            self.code,
            self.status.as_u16()
        )
    }
}

impl std::error::Error for ApiError {}

/// Whether `e` is the API answering 404.
pub fn is_not_found(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ApiError>()
        .is_some_and(|a| a.status == StatusCode::NOT_FOUND)
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
}

/// `127.0.0.1:7070` -> `http://127.0.0.1:7070`; no trailing slash.
pub fn base_url(api: &str) -> String {
    let api = api.trim().trim_end_matches('/');
    if api.contains("://") {
        api.to_string()
    } else {
        format!("http://{api}")
    }
}

/// Where the key file is looked for: `$HATCH_DATA_DIR/api-key`, else
/// `$HOME/.local/share/hatch/api-key`.
pub fn key_file(data_dir: Option<OsString>, home: Option<OsString>) -> Option<PathBuf> {
    match data_dir.filter(|d| !d.is_empty()) {
        Some(d) => Some(PathBuf::from(d).join("api-key")),
        None => home
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(".local/share/hatch/api-key")),
    }
}

/// The API key: the flag or variable, else the key file.
fn api_key(args: &ApiArgs) -> anyhow::Result<String> {
    if let Some(k) = args.api_key.as_deref().map(str::trim)
        && !k.is_empty()
    {
        return Ok(k.to_string());
    }
    let Some(path) = key_file(std::env::var_os("HATCH_DATA_DIR"), std::env::var_os("HOME")) else {
        bail!(
            "no API key: pass --api-key or set HATCH_API_KEY (HOME and HATCH_DATA_DIR are unset, so there is no key file to read)"
        );
    };
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => Ok(text.trim().to_string()),
        Ok(_) => bail!(
            "no API key: {} is empty; pass --api-key or set HATCH_API_KEY",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "no API key: pass --api-key, set HATCH_API_KEY, or write the key to {} (`hatch serve` printed one on first start; scripts/up.sh writes that file)",
            path.display()
        ),
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "no API key given, and the key file {} cannot be read",
            path.display()
        ))),
    }
}

impl Client {
    pub fn new(args: &ApiArgs) -> anyhow::Result<Client> {
        let key = api_key(args)?;
        Ok(Client {
            http: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(5))
                .timeout(std::time::Duration::from_secs(120))
                .build()
                .context("building the HTTP client")?,
            base: base_url(&args.api),
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
        self.send(req, method, path).await
    }

    /// `POST path` with `file` as the body, streamed (no time limit: an
    /// image may be large).
    pub async fn upload(&self, path: &str, file: &std::path::Path) -> anyhow::Result<Value> {
        let f = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("opening {}", file.display()))?;
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(f));
        let req = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .build()
            .context("building the HTTP client")?
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
            .body(body);
        let resp = self.send(req, Method::POST, path).await?;
        resp.json().await.context("decoding the API's answer")
    }

    /// A request with the key and no overall time limit (streams), sent
    /// with [`Client::send`].
    pub fn streaming(&self, method: Method, path: &str) -> anyhow::Result<reqwest::RequestBuilder> {
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .build()
            .context("building the HTTP client")?;
        Ok(http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key))
    }

    /// The API's address and the key, for connections reqwest does not
    /// make (WebSockets).
    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// Send `req`; an error answer becomes an [`ApiError`].
    pub async fn send(
        &self,
        req: reqwest::RequestBuilder,
        method: Method,
        path: &str,
    ) -> anyhow::Result<reqwest::Response> {
        let url = format!("{}{path}", self.base);
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                anyhow::anyhow!(
                    "cannot reach the Hatch API at {}: is `hatch serve` running?",
                    self.base
                )
            } else if e.is_builder() {
                anyhow::anyhow!("bad API address '{}' (--api / HATCH_API): {e}", self.base)
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
        let err = match parsed.as_ref().and_then(|v| v.get("error")) {
            Some(err) => ApiError {
                status,
                code: err["code"].as_str().unwrap_or("error").to_string(),
                message: err["message"]
                    .as_str()
                    .unwrap_or("request failed")
                    .to_string(),
            },
            None if status == StatusCode::NOT_FOUND => ApiError {
                status,
                code: "not_found".into(),
                message: format!("not found: {path}"),
            },
            None => ApiError {
                status,
                code: "error".into(),
                message: text,
            },
        };
        Err(err.into())
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
        find_id(&list["vms"], "name", id_or_name)
            .with_context(|| format!("no vm with id or name '{id_or_name}'"))
    }

    /// Accept a route id ("rt-...") or the route's host name.
    pub async fn route_id(&self, id_or_host: &str) -> anyhow::Result<String> {
        if id_or_host.starts_with("rt-") {
            return Ok(id_or_host.to_string());
        }
        let list = self.json(Method::GET, "/routes", None).await?;
        find_id(&list["routes"], "hostname", id_or_host)
            .with_context(|| format!("no route with id or host name '{id_or_host}'"))
    }
}

/// The `id` of the first record in `list` whose `field` is `wanted` (host
/// names compare without case), or whose id is.
fn find_id(list: &Value, field: &str, wanted: &str) -> Option<String> {
    let records = list.as_array()?;
    records
        .iter()
        .find(|r| {
            r[field]
                .as_str()
                .is_some_and(|v| v.eq_ignore_ascii_case(wanted))
                || r["id"] == wanted
        })
        .and_then(|r| r["id"].as_str())
        .map(String::from)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn api_address_without_scheme_gets_http() {
        assert_eq!(base_url("127.0.0.1:7070"), "http://127.0.0.1:7070");
        assert_eq!(base_url("localhost:7070/"), "http://localhost:7070");
        assert_eq!(base_url("http://127.0.0.1:7070/"), "http://127.0.0.1:7070");
        assert_eq!(base_url("https://hatch.example"), "https://hatch.example");
        assert_eq!(base_url(" [::1]:7070 "), "http://[::1]:7070");
    }

    #[test]
    fn key_file_is_in_the_data_dir_else_under_home() {
        assert_eq!(
            key_file(Some("/srv/hatch".into()), Some("/home/u".into())),
            Some(PathBuf::from("/srv/hatch/api-key"))
        );
        assert_eq!(
            key_file(None, Some("/home/u".into())),
            Some(PathBuf::from("/home/u/.local/share/hatch/api-key"))
        );
        assert_eq!(
            key_file(Some("".into()), Some("/home/u".into())),
            Some(PathBuf::from("/home/u/.local/share/hatch/api-key"))
        );
        assert_eq!(key_file(None, None), None);
    }

    #[test]
    fn ids_are_found_by_name_or_id() {
        let routes = json!([
            {"id": "rt-a", "hostname": "a.localhost"},
            {"id": "rt-b", "hostname": "z.localhost"},
        ]);
        assert_eq!(
            find_id(&routes, "hostname", "Z.localhost").as_deref(),
            Some("rt-b")
        );
        assert_eq!(
            find_id(&routes, "hostname", "rt-a").as_deref(),
            Some("rt-a")
        );
        assert_eq!(find_id(&routes, "hostname", "y.localhost"), None);
        assert_eq!(find_id(&Value::Null, "hostname", "a"), None);
    }

    #[test]
    fn api_errors_read_like_before_and_know_their_status() {
        let e: anyhow::Error = ApiError {
            status: StatusCode::NOT_FOUND,
            code: "not_found".into(),
            message: "vm 'x' not found".into(),
        }
        .into();
        assert_eq!(e.to_string(), "vm 'x' not found (not_found, HTTP 404)");
        assert!(is_not_found(&e));
        assert!(!is_not_found(&anyhow::anyhow!("other")));
    }
}
