//! `hatch node`: the daemons of a cluster (one, without a shared database).

use clap::Subcommand;
use reqwest::Method;
use serde_json::Value;

use crate::client::{ApiArgs, Client};
use crate::output;

#[derive(Subcommand)]
pub enum NodeCommand {
    /// List nodes: name, address, state (up, down, draining), VMs running,
    /// free memory and the age of the last heartbeat.
    #[command(alias = "ls")]
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub async fn run(cmd: NodeCommand) -> anyhow::Result<()> {
    match cmd {
        NodeCommand::List { api } => {
            let c = Client::new(&api)?;
            let nodes = c.json(Method::GET, "/nodes", None).await?;
            if api.json {
                output::json(&nodes);
                return Ok(());
            }
            let rows = nodes["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|n: &Value| {
                    vec![
                        output::field(n, "name"),
                        output::field(n, "address"),
                        output::field(n, "state"),
                        output::field(n, "vms"),
                        format!("{} MiB", output::field(n, "free_memory_mib")),
                        format!("{}s ago", output::field(n, "seconds_since_heartbeat")),
                    ]
                })
                .collect();
            output::table(
                &[
                    "NAME",
                    "ADDRESS",
                    "STATE",
                    "VMS",
                    "FREE MEMORY",
                    "HEARTBEAT",
                ],
                rows,
            );
        }
    }
    Ok(())
}
