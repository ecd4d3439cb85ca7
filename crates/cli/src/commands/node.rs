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
    /// Mark a node draining (new wakes avoid it) and move its running and
    /// suspended VMs to the least loaded other nodes.
    Drain {
        /// Node name.
        node: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Let a drained node take VMs again.
    Undrain {
        /// Node name.
        node: String,
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
        NodeCommand::Drain { node, api } => {
            let c = Client::new(&api)?;
            let report = c
                .json(Method::POST, &format!("/nodes/{node}/drain"), None)
                .await?;
            if api.json {
                output::json(&report);
                return Ok(());
            }
            for m in report["moved"].as_array().into_iter().flatten() {
                println!(
                    "moved {} to {}",
                    output::field(m, "vm"),
                    output::field(m, "to")
                );
            }
            for l in report["left"].as_array().into_iter().flatten() {
                println!(
                    "left {} ({}): {}",
                    output::field(l, "vm"),
                    output::field(l, "state"),
                    output::field(l, "reason")
                );
            }
            println!("node {node} is draining");
        }
        NodeCommand::Undrain { node, api } => {
            let c = Client::new(&api)?;
            c.json(Method::POST, &format!("/nodes/{node}/undrain"), None)
                .await?;
            if api.json {
                output::json(&serde_json::json!({ "node": node, "state": "up" }));
            } else {
                println!("node {node} takes VMs again");
            }
        }
    }
    Ok(())
}
