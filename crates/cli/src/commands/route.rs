use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{ApiArgs, Client};
use crate::output;
use crate::parse;

#[derive(Subcommand)]
pub enum RouteCommand {
    /// Route a host name to a VM port.
    Create {
        /// Host name, e.g. app.localhost (requests are routed by their Host
        /// header; the port is ignored).
        #[arg(long)]
        host: String,
        /// VM id or name.
        #[arg(long)]
        vm: String,
        /// Guest port the requests go to [default: 8080].
        #[arg(long)]
        port: Option<u16>,
        /// Do not wake a snapshotted VM on requests [default: requests wake it].
        #[arg(long)]
        no_auto_wake: bool,
        /// Suspend the VM after this long without traffic: seconds (e.g.
        /// 300) or a duration such as 90s, 5m [default: never suspended for
        /// idleness].
        #[arg(long, value_parser = parse::duration)]
        idle_timeout: Option<std::time::Duration>,
        /// A path prefix (e.g. /healthz) whose requests neither wake the VM
        /// nor keep it awake; repeatable [default: none].
        #[arg(long = "idle-ignore-path")]
        idle_ignore_paths: Vec<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List routes with their VM's state.
    #[command(alias = "ls")]
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete a route.
    #[command(alias = "delete")]
    Rm {
        /// Route id (rt-...) or host name.
        route: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub async fn run(cmd: RouteCommand) -> anyhow::Result<()> {
    match cmd {
        RouteCommand::Create {
            host,
            vm,
            port,
            no_auto_wake,
            idle_timeout,
            idle_ignore_paths,
            api,
        } => {
            let c = Client::new(&api)?;
            let vm_id = c.vm_id(&vm).await?;
            let mut body = json!({ "hostname": host, "vm_id": vm_id, "auto_wake": !no_auto_wake });
            if let Some(p) = port {
                body["port"] = p.into();
            }
            if let Some(t) = idle_timeout {
                body["idle_timeout_seconds"] = t.as_secs().into();
            }
            if !idle_ignore_paths.is_empty() {
                body["idle_ignore_paths"] = idle_ignore_paths.into();
            }
            let route = c.json(Method::POST, "/routes", Some(&body)).await?;
            if api.json {
                output::json(&route);
            } else {
                output::record(&route);
            }
        }
        RouteCommand::List { api } => {
            let c = Client::new(&api)?;
            let routes = c.json(Method::GET, "/routes", None).await?;
            if api.json {
                output::json(&routes);
                return Ok(());
            }
            let rows = routes["routes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r: &Value| {
                    vec![
                        output::field(r, "id"),
                        output::field(r, "hostname"),
                        output::field(r, "vm_id"),
                        output::field(r, "vm_state"),
                        output::field(r, "port"),
                        output::field(r, "auto_wake"),
                        output::field(r, "idle_timeout_seconds"),
                    ]
                })
                .collect();
            output::table(
                &[
                    "ID",
                    "HOST",
                    "VM",
                    "VM STATE",
                    "PORT",
                    "AUTO WAKE",
                    "IDLE TIMEOUT (s)",
                ],
                rows,
            );
        }
        RouteCommand::Rm { route, api } => {
            let c = Client::new(&api)?;
            let id = c.route_id(&route).await?;
            c.json(Method::DELETE, &format!("/routes/{id}"), None)
                .await?;
            if api.json {
                output::json(&json!({ "deleted": id }));
            } else {
                println!("deleted {id}");
            }
        }
    }
    Ok(())
}
