use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::client::{ApiArgs, Client};
use crate::output;

#[derive(Subcommand)]
pub enum VmCommand {
    /// Create and boot a VM.
    Create {
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        image: Option<String>,
        #[arg(long)]
        vcpus: Option<u32>,
        /// Memory in MiB.
        #[arg(long = "memory", alias = "memory-mib")]
        memory_mib: Option<u64>,
        /// Disk size in MiB (at least the image's).
        #[arg(long = "disk", alias = "disk-mib")]
        disk_mib: Option<u64>,
        /// Wait until the VM runs (or fails).
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List VMs.
    #[command(alias = "ls")]
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one VM (by id or name).
    Get {
        vm: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Boot a stopped VM.
    Start {
        vm: String,
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Stop a running VM (QEMU exits; its disk is kept).
    Stop {
        vm: String,
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete a VM with its disk and routes.
    #[command(alias = "delete")]
    Rm {
        vm: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Wake a suspended VM, or roll a running one back, from a snapshot.
    Restore {
        vm: String,
        /// Default: the newest restorable snapshot.
        #[arg(long)]
        snapshot: Option<String>,
        /// Wait until the VM runs, showing progress.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show or set which snapshots are kept.
    Retention {
        vm: String,
        /// Keep the newest N snapshots.
        #[arg(long)]
        keep_last: Option<u32>,
        /// Delete snapshots older than this, e.g. 7d.
        #[arg(long, value_parser = humantime::parse_duration)]
        max_age: Option<Duration>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Wakes and idle suspends of the VM, newest first.
    Events {
        vm: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print the VM's serial console.
    Logs {
        vm: String,
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub async fn run(cmd: VmCommand) -> anyhow::Result<()> {
    match cmd {
        VmCommand::Create {
            name,
            image,
            vcpus,
            memory_mib,
            disk_mib,
            wait,
            api,
        } => {
            let c = Client::new(&api)?;
            let mut body = serde_json::Map::new();
            let fields = [
                ("name", name.map(Value::from)),
                ("image", image.map(Value::from)),
                ("vcpus", vcpus.map(Value::from)),
                ("memory_mib", memory_mib.map(Value::from)),
                ("disk_mib", disk_mib.map(Value::from)),
            ];
            for (k, v) in fields {
                if let Some(v) = v {
                    body.insert(k.into(), v);
                }
            }
            let mut vm = c
                .json(Method::POST, "/vms", Some(&Value::Object(body)))
                .await?;
            if wait {
                vm = wait_for(&c, &output::field(&vm, "id"), &["running"]).await?;
            }
            show_vm(&api, &vm);
        }
        VmCommand::List { api } => {
            let c = Client::new(&api)?;
            let list = c.json(Method::GET, "/vms", None).await?;
            if api.json {
                output::json(&list);
                return Ok(());
            }
            let rows = list["vms"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|vm| {
                    vec![
                        output::field(vm, "id"),
                        output::field(vm, "name"),
                        output::field(vm, "state"),
                        output::field(vm, "image"),
                        output::field(vm, "vcpus"),
                        format!("{} MiB", output::field(vm, "memory_mib")),
                        output::field(vm, "created_at"),
                    ]
                })
                .collect();
            output::table(
                &["ID", "NAME", "STATE", "IMAGE", "VCPUS", "MEMORY", "CREATED"],
                rows,
            );
        }
        VmCommand::Get { vm, api } => {
            let c = Client::new(&api)?;
            let id = c.vm_id(&vm).await?;
            show_vm(
                &api,
                &c.json(Method::GET, &format!("/vms/{id}"), None).await?,
            );
        }
        VmCommand::Start { vm, wait, api } => {
            let c = Client::new(&api)?;
            let id = c.vm_id(&vm).await?;
            let mut vm = c
                .json(Method::POST, &format!("/vms/{id}/start"), None)
                .await?;
            if wait {
                vm = wait_for(&c, &id, &["running"]).await?;
            }
            show_vm(&api, &vm);
        }
        VmCommand::Stop { vm, wait, api } => {
            let c = Client::new(&api)?;
            let id = c.vm_id(&vm).await?;
            let mut vm = c
                .json(Method::POST, &format!("/vms/{id}/stop"), None)
                .await?;
            if wait {
                vm = wait_for(&c, &id, &["stopped"]).await?;
            }
            show_vm(&api, &vm);
        }
        VmCommand::Rm { vm, api } => {
            let c = Client::new(&api)?;
            let id = c.vm_id(&vm).await?;
            c.json(Method::DELETE, &format!("/vms/{id}"), None).await?;
            if api.json {
                output::json(&json!({ "deleted": id }));
            } else {
                println!("deleted {id}");
            }
        }
        VmCommand::Restore {
            vm,
            snapshot,
            wait,
            api,
        } => {
            let c = Client::new(&api)?;
            let id = c.vm_id(&vm).await?;
            let body = match snapshot {
                Some(s) => json!({ "snapshot_id": s }),
                None => json!({}),
            };
            let mut vm = c
                .json(Method::POST, &format!("/vms/{id}/restore"), Some(&body))
                .await?;
            if wait {
                let bar = super::snapshot::spinner(api.json);
                bar.set_message(format!("restoring {id}"));
                // Until the restore ends: running, or back where it was.
                loop {
                    vm = c.json(Method::GET, &format!("/vms/{id}"), None).await?;
                    if output::field(&vm, "state") != "restoring" {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                bar.finish_and_clear();
                if output::field(&vm, "state") != "running" {
                    bail!("restore failed: {}", output::field(&vm, "state_reason"));
                }
            }
            show_vm(&api, &vm);
        }
        VmCommand::Retention {
            vm,
            keep_last,
            max_age,
            api,
        } => {
            let c = Client::new(&api)?;
            let id = c.vm_id(&vm).await?;
            let path = format!("/vms/{id}/retention");
            let r = if keep_last.is_none() && max_age.is_none() {
                c.json(Method::GET, &path, None).await?
            } else {
                let body = json!({ "keep_last": keep_last, "max_age_seconds": max_age.map(|d| d.as_secs()) });
                c.json(Method::PUT, &path, Some(&body)).await?
            };
            show_vm(&api, &r);
        }
        VmCommand::Events { vm, api } => {
            let c = Client::new(&api)?;
            let id = c.vm_id(&vm).await?;
            let events = c
                .json(Method::GET, &format!("/vms/{id}/events"), None)
                .await?;
            if api.json {
                output::json(&events);
                return Ok(());
            }
            let rows = events["events"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    [
                        "at",
                        "kind",
                        "trigger",
                        "duration_ms",
                        "snapshot_id",
                        "error",
                    ]
                    .iter()
                    .map(|f| output::field(e, f))
                    .collect()
                })
                .collect();
            output::table(&["AT", "KIND", "TRIGGER", "MS", "SNAPSHOT", "ERROR"], rows);
        }
        VmCommand::Logs { vm, follow, api } => {
            let c = Client::new(&api)?;
            let id = c.vm_id(&vm).await?;
            let mut offset = 0u64;
            let mut stdout = tokio::io::stdout();
            loop {
                let resp = c
                    .request(
                        Method::GET,
                        &format!("/vms/{id}/logs?offset={offset}"),
                        None,
                    )
                    .await?;
                let next = resp
                    .headers()
                    .get("x-next-offset")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(offset);
                let bytes = resp.bytes().await?;
                stdout.write_all(&bytes).await?;
                stdout.flush().await?;
                let caught_up = next == offset;
                offset = next;
                if caught_up && !follow {
                    break;
                }
                if caught_up {
                    // The API has no push channel for console output; poll.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
    Ok(())
}

fn show_vm(api: &ApiArgs, vm: &Value) {
    if api.json {
        output::json(vm);
    } else {
        output::record(vm);
    }
}

/// Poll the VM until it reaches one of `states`; fail if it fails.
async fn wait_for(c: &Client, id: &str, states: &[&str]) -> anyhow::Result<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let vm = c.json(Method::GET, &format!("/vms/{id}"), None).await?;
        let state = output::field(&vm, "state");
        if states.contains(&state.as_str()) {
            return Ok(vm);
        }
        if state == "failed" {
            bail!("vm {id} failed: {}", output::field(&vm, "state_reason"));
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for vm {id} (state {state})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `hatch storage`.
pub async fn storage(api: ApiArgs) -> anyhow::Result<()> {
    let c = Client::new(&api)?;
    let usage = c.json(Method::GET, "/storage", None).await?;
    if api.json {
        output::json(&usage);
        return Ok(());
    }
    let mib = |v: &Value| format!("{:.1} MiB", v.as_u64().unwrap_or(0) as f64 / 1048576.0);
    let mut rows: Vec<Vec<String>> = usage["vms"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            vec![
                output::field(v, "vm_id"),
                output::field(v, "name"),
                output::field(v, "snapshots"),
                mib(&v["logical_bytes"]),
                mib(&v["stored_bytes"]),
            ]
        })
        .collect();
    let t = &usage["total"];
    rows.push(vec![
        "TOTAL".into(),
        "".into(),
        output::field(t, "snapshots"),
        mib(&t["logical_bytes"]),
        mib(&t["stored_bytes"]),
    ]);
    output::table(
        &["VM", "NAME", "SNAPSHOTS", "LOGICAL", "STORED IN S3"],
        rows,
    );
    let (local, up) = (&usage["local"], &usage["uploads"]);
    println!(
        "\nlocal copies: {} snapshots, {} of a {} budget ({} evictable, {} evicted)",
        output::field(local, "snapshots"),
        mib(&local["bytes"]),
        mib(&local["budget_bytes"]),
        mib(&local["evictable_bytes"]),
        output::field(local, "evictions"),
    );
    println!(
        "uploads: {} queued, {} in progress, {} retries; manifest deletions pending: {}",
        output::field(up, "queued"),
        output::field(up, "in_progress"),
        output::field(up, "retries"),
        output::field(&usage, "pending_deletes"),
    );
    if let Some(e) = up["last_error"].as_str() {
        println!(
            "last upload error ({}): {e}",
            output::field(up, "last_error_at")
        );
    }
    Ok(())
}
