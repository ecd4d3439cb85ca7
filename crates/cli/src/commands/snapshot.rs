use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{ApiArgs, Client};
use crate::output;

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot a VM: a checkpoint (it runs on), or with --stop a suspend.
    Create {
        vm: String,
        /// Suspend: the VM ends `snapshotted` and frees its memory.
        #[arg(long)]
        stop: bool,
        /// Wait until the snapshot is in S3 (or failed), showing progress.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List a VM's snapshots, newest first.
    #[command(alias = "ls")]
    List {
        vm: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    Get {
        vm: String,
        snapshot: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    #[command(alias = "delete")]
    Rm {
        vm: String,
        snapshot: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub async fn run(cmd: SnapshotCommand) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::Create {
            vm,
            stop,
            wait,
            api,
        } => {
            let c = Client::new(&api)?;
            let id = c.vm_id(&vm).await?;
            let mut snap = c
                .json(
                    Method::POST,
                    &format!("/vms/{id}/snapshot"),
                    Some(&json!({ "stop": stop })),
                )
                .await?;
            if wait {
                snap = wait_snapshot(&c, &id, &output::field(&snap, "id"), api.json).await?;
            }
            show(&api, &snap);
        }
        SnapshotCommand::List { vm, api } => {
            let c = Client::new(&api)?;
            let id = c.vm_id(&vm).await?;
            let list = c
                .json(Method::GET, &format!("/vms/{id}/snapshots"), None)
                .await?;
            if api.json {
                output::json(&list);
                return Ok(());
            }
            let rows = list["snapshots"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    vec![
                        output::field(s, "id"),
                        output::field(s, "status"),
                        output::field(s, "trigger"),
                        output::field(s, "created_at"),
                        format!("{} ms", output::field(s, "pause_ms")),
                        mib(&s["memory_bytes"]),
                        mib(&s["stored_bytes"]),
                    ]
                })
                .collect();
            output::table(
                &[
                    "ID", "STATUS", "TRIGGER", "CREATED", "PAUSE", "MEMORY", "STORED",
                ],
                rows,
            );
        }
        SnapshotCommand::Get { vm, snapshot, api } => {
            let c = Client::new(&api)?;
            let id = c.vm_id(&vm).await?;
            show(
                &api,
                &c.json(
                    Method::GET,
                    &format!("/vms/{id}/snapshots/{snapshot}"),
                    None,
                )
                .await?,
            );
        }
        SnapshotCommand::Rm { vm, snapshot, api } => {
            let c = Client::new(&api)?;
            let id = c.vm_id(&vm).await?;
            c.json(
                Method::DELETE,
                &format!("/vms/{id}/snapshots/{snapshot}"),
                None,
            )
            .await?;
            println!("deleted {snapshot}");
        }
    }
    Ok(())
}

fn show(api: &ApiArgs, v: &Value) {
    if api.json {
        output::json(v);
    } else {
        output::record(v);
    }
}

fn mib(v: &Value) -> String {
    v.as_u64()
        .map(|b| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0)))
        .unwrap_or_else(|| "-".into())
}

/// A spinner that shows the operation's current status while polling.
pub fn spinner(quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

async fn wait_snapshot(c: &Client, vm: &str, sid: &str, quiet: bool) -> anyhow::Result<Value> {
    let bar = spinner(quiet);
    loop {
        let snap = c
            .json(Method::GET, &format!("/vms/{vm}/snapshots/{sid}"), None)
            .await?;
        let status = output::field(&snap, "status");
        bar.set_message(format!("snapshot {sid}: {status}"));
        match status.as_str() {
            "ready" => {
                bar.finish_and_clear();
                return Ok(snap);
            }
            "failed" => {
                bar.finish_and_clear();
                bail!("snapshot {sid} failed: {}", output::field(&snap, "error"));
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
