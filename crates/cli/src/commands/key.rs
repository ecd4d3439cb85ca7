//! `hatch key`: API keys. Keys are stored hashed; a created key is shown
//! once, in the answer of `create`.

use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{ApiArgs, Client};
use crate::output;

#[derive(Subcommand)]
pub enum KeyCommand {
    /// List API keys (ids, names, where they came from; never the keys).
    #[command(alias = "ls")]
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Create a key; it is printed once and cannot be shown again.
    Create {
        /// A name to recognise it by (letters, digits, '.', '_', '-')
        /// [default: none, the key is known by its id].
        name: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Revoke a key by id or name: it is refused from now on.
    #[command(alias = "rm")]
    Revoke {
        /// Key id or name, as `hatch key list` shows.
        key: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub async fn run(cmd: KeyCommand) -> anyhow::Result<()> {
    match cmd {
        KeyCommand::List { api } => {
            let c = Client::new(&api)?;
            let keys = c.json(Method::GET, "/keys", None).await?;
            if api.json {
                output::json(&keys);
                return Ok(());
            }
            let rows = keys["keys"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|k: &Value| {
                    vec![
                        output::field(k, "id"),
                        output::field(k, "name"),
                        output::field(k, "source"),
                        output::field(k, "created_at"),
                    ]
                })
                .collect();
            output::table(&["ID", "NAME", "SOURCE", "CREATED"], rows);
        }
        KeyCommand::Create { name, api } => {
            let c = Client::new(&api)?;
            let body = match name {
                Some(n) => json!({ "name": n }),
                None => json!({}),
            };
            let key = c.json(Method::POST, "/keys", Some(&body)).await?;
            if api.json {
                output::json(&key);
            } else {
                println!("{}", output::field(&key, "key"));
                eprintln!(
                    "created {} (shown only this once; revoke with `hatch key revoke {}`)",
                    output::field(&key, "id"),
                    output::field(&key, "id")
                );
            }
        }
        KeyCommand::Revoke { key, api } => {
            let c = Client::new(&api)?;
            c.json(Method::DELETE, &format!("/keys/{key}"), None)
                .await
                .map_err(|e| {
                    if crate::client::is_not_found(&e) {
                        anyhow::anyhow!("no API key with id or name '{key}'")
                    } else {
                        e
                    }
                })?;
            if api.json {
                output::json(&json!({ "revoked": key }));
            } else {
                println!("revoked {key}");
            }
        }
    }
    Ok(())
}
