use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{self, ApiArgs, Client};
use crate::output;
use crate::parse;
use crate::progress::Progress;

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot a VM: a checkpoint (it runs on), or with --stop a suspend.
    Create {
        /// VM id or name.
        vm: String,
        /// Suspend: the VM ends `snapshotted` and frees its memory [default:
        /// a checkpoint, the VM runs on].
        #[arg(long)]
        stop: bool,
        /// Wait until the snapshot is in S3 (`ready`) or failed, showing its
        /// phases on stderr [default: return at once, pending].
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (seconds, or e.g. 90s, 30m).
        #[arg(long, value_parser = parse::duration, default_value = "30m")]
        timeout: Duration,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List a VM's snapshots, newest first.
    #[command(alias = "ls")]
    List {
        /// VM id or name.
        vm: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one snapshot.
    Get {
        /// VM id or name.
        vm: String,
        /// Snapshot id (snap-...), as `hatch snapshot list` shows.
        snapshot: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete a snapshot (its chunks go at the next `hatch storage gc`).
    #[command(alias = "delete")]
    Rm {
        /// VM id or name.
        vm: String,
        /// Snapshot id (snap-...), as `hatch snapshot list` shows.
        snapshot: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// A 404 names what the user typed.
fn snapshot_not_found(e: anyhow::Error, vm: &str, snapshot: &str) -> anyhow::Error {
    if client::is_not_found(&e) {
        anyhow::anyhow!("snapshot '{snapshot}' of vm '{vm}' not found")
    } else {
        e
    }
}

pub async fn run(cmd: SnapshotCommand) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::Create {
            vm,
            stop,
            wait,
            timeout,
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
                snap = wait_snapshot(&c, &id, snap, timeout).await?;
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
            let snap = c
                .json(
                    Method::GET,
                    &format!("/vms/{id}/snapshots/{snapshot}"),
                    None,
                )
                .await
                .map_err(|e| snapshot_not_found(e, &vm, &snapshot))?;
            show(&api, &snap);
        }
        SnapshotCommand::Rm { vm, snapshot, api } => {
            let c = Client::new(&api)?;
            let id = c.vm_id(&vm).await?;
            c.json(
                Method::DELETE,
                &format!("/vms/{id}/snapshots/{snapshot}"),
                None,
            )
            .await
            .map_err(|e| snapshot_not_found(e, &vm, &snapshot))?;
            if api.json {
                output::json(&json!({ "deleted": snapshot }));
            } else {
                println!("deleted {snapshot}");
            }
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

/// The sizes a snapshot record tells so far: "memory 256.0 MiB, disk 1.0
/// GiB, stored 12.3 MiB" (zero and absent sizes left out).
pub fn sizes(snap: &Value) -> String {
    [
        ("memory", "memory_bytes"),
        ("disk", "disk_bytes"),
        ("stored", "stored_bytes"),
    ]
    .iter()
    .filter_map(|(label, key)| {
        snap[*key]
            .as_u64()
            .filter(|&b| b > 0)
            .map(|b| format!("{label} {}", output::bytes(b)))
    })
    .collect::<Vec<_>>()
    .join(", ")
}

/// (progress_bytes, total_bytes) when the daemon reports them.
fn transfer(snap: &Value) -> Option<(u64, u64)> {
    Some((
        snap["progress_bytes"].as_u64()?,
        snap["total_bytes"].as_u64()?,
    ))
}

/// Poll the snapshot (as first answered: `snap`) until it is ready or
/// failed, showing its phases on stderr.
async fn wait_snapshot(
    c: &Client,
    vm: &str,
    mut snap: Value,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let sid = snap["id"]
        .as_str()
        .context("the daemon answered a snapshot without an id")?
        .to_string();
    let mut progress = Progress::new(format!("snapshot {sid}"));
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let status = output::field(&snap, "status");
        match status.as_str() {
            "ready" => {
                let mut detail = sizes(&snap);
                if let Some(ms) = snap["pause_ms"].as_u64() {
                    detail.push_str(&format!(", paused {ms} ms"));
                }
                progress.finish("ready", detail.trim_start_matches(", "));
                return Ok(snap);
            }
            "failed" => {
                bail!("snapshot {sid} failed: {}", output::field(&snap, "error"));
            }
            _ => {
                if tokio::time::Instant::now() > deadline {
                    bail!(
                        "gave up after {} waiting for snapshot {sid}, which is {status}; it goes on (see `hatch snapshot get {vm} {sid}`)",
                        humantime::format_duration(timeout)
                    );
                }
                let mut detail = sizes(&snap);
                // Upload attempts that failed are retried; say why.
                if let Some(e) = snap["error"].as_str() {
                    detail.push_str(&format!("; retrying after: {e}"));
                }
                progress.update(&status, &detail, transfer(&snap));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        snap = c
            .json(Method::GET, &format!("/vms/{vm}/snapshots/{sid}"), None)
            .await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_leave_out_what_is_not_known_yet() {
        assert_eq!(
            sizes(&json!({ "memory_bytes": 268435456u64, "disk_bytes": 0, "stored_bytes": 1536 })),
            "memory 256.0 MiB, stored 1.5 KiB"
        );
        assert_eq!(sizes(&json!({ "status": "pending" })), "");
        assert_eq!(
            transfer(&json!({ "progress_bytes": 5, "total_bytes": 10 })),
            Some((5, 10))
        );
        assert_eq!(transfer(&json!({ "progress_bytes": 5 })), None);
    }
}
