use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::client::{self, ApiArgs, Client};
use crate::output;
use crate::parse::{self, Limit};
use crate::progress::Progress;

#[derive(Subcommand)]
pub enum VmCommand {
    /// Create and boot a VM.
    Create {
        /// Name of the VM: lowercase letters, digits and '-', at most 63
        /// [default: the VM's id].
        #[arg(long)]
        name: Option<String>,
        /// Guest image to boot (see `hatch image list`) [default: default].
        #[arg(long)]
        image: Option<String>,
        /// Virtual CPUs [default: 1].
        #[arg(long)]
        vcpus: Option<u32>,
        /// Memory in MiB [default: 256].
        #[arg(long = "memory", alias = "memory-mib")]
        memory_mib: Option<u64>,
        /// Disk size in MiB [default: the image's disk size, also the least allowed].
        #[arg(long = "disk", alias = "disk-mib")]
        disk_mib: Option<u64>,
        /// Fork: create the VM from this snapshot (a snapshot id), with the
        /// memory and disk it captured [default: boot the image].
        #[arg(long = "from", value_name = "SNAPSHOT_ID")]
        from_snapshot: Option<String>,
        /// A container image's app: set an environment variable
        /// (KEY=VALUE; repeatable) [default: the image's environment].
        #[arg(short, long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// A container image's app: restart it when it exits: no,
        /// on-failure (at most --max-retries times in a row) or always
        /// [default: no: the VM stops, saying how the app ended].
        #[arg(long, value_name = "POLICY")]
        restart: Option<String>,
        /// With --restart on-failure: restarts in a row at most [default: 10].
        #[arg(long)]
        max_retries: Option<u32>,
        /// Wait until the VM runs and its app answers on its port (the VM's
        /// `ready`; just `running` with a daemon that does not report it),
        /// showing progress on stderr [default: return at once, booting].
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (seconds, or e.g. 90s, 5m).
        #[arg(long, value_parser = parse::duration, default_value = "5m")]
        timeout: Duration,
        /// A container image's app: arguments replacing the image's Cmd
        /// (after `--`) [default: the image's Cmd].
        #[arg(last = true)]
        cmd: Vec<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List VMs.
    #[command(alias = "ls")]
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one VM.
    Get {
        /// VM id or name.
        vm: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Boot a stopped VM.
    Start {
        /// VM id or name.
        vm: String,
        /// Wait until the VM runs and its app answers on its port (the VM's
        /// `ready`; just `running` with a daemon that does not report it),
        /// showing progress on stderr [default: return at once, starting].
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (seconds, or e.g. 90s, 5m).
        #[arg(long, value_parser = parse::duration, default_value = "5m")]
        timeout: Duration,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Stop a running VM (QEMU exits; its disk is kept).
    Stop {
        /// VM id or name.
        vm: String,
        /// Wait until the VM is stopped [default: return at once, stopping].
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (seconds, or e.g. 90s, 5m).
        #[arg(long, value_parser = parse::duration, default_value = "5m")]
        timeout: Duration,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Move a VM to another node of the cluster: suspended where it runs,
    /// then woken there from S3 (same memory, disk and boot).
    Move {
        /// VM id or name.
        vm: String,
        /// The node to move to (`hatch node list`).
        #[arg(long)]
        to: String,
        /// Leave it suspended on that node (its next request wakes it)
        /// [default: wake it there at once].
        #[arg(long)]
        no_start: bool,
        /// Wait until it runs on that node [default: return once it is handed over].
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (seconds, or e.g. 90s, 5m).
        #[arg(long, value_parser = parse::duration, default_value = "10m")]
        timeout: Duration,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete a VM with its disk and routes.
    #[command(alias = "delete")]
    Rm {
        /// VM id or name.
        vm: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Wake a suspended VM, or roll a running one back, from a snapshot.
    Restore {
        /// VM id or name.
        vm: String,
        /// Snapshot id to restore [default: the newest restorable snapshot].
        #[arg(long)]
        snapshot: Option<String>,
        /// Wait until the VM runs again (and its app answers, where the
        /// daemon reports `ready`), showing progress on stderr [default:
        /// return at once, restoring].
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (seconds, or e.g. 90s, 5m).
        #[arg(long, value_parser = parse::duration, default_value = "5m")]
        timeout: Duration,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show or change which snapshots are kept; a limit not given stays as it was.
    Retention {
        /// VM id or name.
        vm: String,
        /// Keep the newest N snapshots; `none` removes the limit [default:
        /// unchanged; a new VM has no limit].
        #[arg(long, value_parser = parse::count_limit, value_name = "N|none")]
        keep_last: Option<Limit<u32>>,
        /// Delete snapshots older than this (seconds, or e.g. 12h, 7d);
        /// `none` removes the limit [default: unchanged; a new VM has no
        /// limit].
        #[arg(long, value_parser = parse::age_limit, value_name = "AGE|none")]
        max_age: Option<Limit<Duration>>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Wakes and idle suspends of the VM, newest first.
    Events {
        /// VM id or name.
        vm: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Run a command in the VM (woken if suspended) with live output;
    /// exits with the command's exit code.
    Exec(super::exec::ExecArgs),
    /// Copy a file into or out of the VM: `hatch vm cp ./app.conf web:/etc/app.conf`,
    /// `hatch vm cp web:/var/log/app.log -`.
    Cp(super::exec::CpArgs),
    /// Print the VM's serial console.
    Logs {
        /// VM id or name.
        vm: String,
        /// Keep printing new output until interrupted or the VM is deleted.
        #[arg(short, long)]
        follow: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// The body of `POST /vms`: only what was given, the daemon fills in defaults.
fn create_body(
    name: Option<String>,
    image: Option<String>,
    vcpus: Option<u32>,
    memory_mib: Option<u64>,
    disk_mib: Option<u64>,
    from_snapshot: Option<String>,
) -> Value {
    let mut body = serde_json::Map::new();
    let fields = [
        ("name", name.map(Value::from)),
        ("image", image.map(Value::from)),
        ("vcpus", vcpus.map(Value::from)),
        ("memory_mib", memory_mib.map(Value::from)),
        ("disk_mib", disk_mib.map(Value::from)),
        ("from_snapshot", from_snapshot.map(Value::from)),
    ];
    for (k, v) in fields {
        if let Some(v) = v {
            body.insert(k.into(), v);
        }
    }
    Value::Object(body)
}

/// `--env`, `--restart`, `--max-retries` and the trailing command of `vm
/// create`, into its body.
fn add_app_settings(
    body: &mut Value,
    env: &[String],
    restart: Option<String>,
    max_retries: Option<u32>,
    cmd: Vec<String>,
) -> anyhow::Result<()> {
    if !env.is_empty() {
        let mut map = serde_json::Map::new();
        for kv in env {
            let Some((k, v)) = kv.split_once('=') else {
                bail!("--env takes KEY=VALUE, not {kv:?}");
            };
            map.insert(k.to_string(), Value::from(v));
        }
        body["env"] = Value::Object(map);
    }
    if let Some(policy) = restart {
        let mut r = json!({ "policy": policy });
        if let Some(n) = max_retries {
            r["max_retries"] = json!(n);
        }
        body["restart"] = r;
    } else if max_retries.is_some() {
        bail!("--max-retries goes with --restart on-failure");
    }
    if !cmd.is_empty() {
        body["cmd"] = json!(cmd);
    }
    Ok(())
}

pub async fn run(cmd: VmCommand) -> anyhow::Result<()> {
    match cmd {
        VmCommand::Exec(args) => {
            let code = super::exec::exec(args).await?;
            std::process::exit(code);
        }
        VmCommand::Cp(args) => super::exec::cp(args).await?,
        VmCommand::Create {
            name,
            image,
            vcpus,
            memory_mib,
            disk_mib,
            from_snapshot,
            env,
            restart,
            max_retries,
            wait,
            timeout,
            cmd,
            api,
        } => {
            let c = Client::new(&api)?;
            let mut body = create_body(name, image, vcpus, memory_mib, disk_mib, from_snapshot);
            add_app_settings(&mut body, &env, restart, max_retries, cmd)?;
            let mut vm = c.json(Method::POST, "/vms", Some(&body)).await?;
            if wait {
                vm = wait_vm(&c, &vm, Goal::Running, timeout).await?;
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
                        output::field(vm, "node"),
                        output::field(vm, "created_at"),
                    ]
                })
                .collect();
            output::table(
                &[
                    "ID", "NAME", "STATE", "IMAGE", "VCPUS", "MEMORY", "NODE", "CREATED",
                ],
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
        VmCommand::Start {
            vm,
            wait,
            timeout,
            api,
        } => {
            let c = Client::new(&api)?;
            let id = c.vm_id(&vm).await?;
            let mut vm = c
                .json(Method::POST, &format!("/vms/{id}/start"), None)
                .await?;
            if wait {
                vm = wait_vm(&c, &vm, Goal::Running, timeout).await?;
            }
            show_vm(&api, &vm);
        }
        VmCommand::Stop {
            vm,
            wait,
            timeout,
            api,
        } => {
            let c = Client::new(&api)?;
            let id = c.vm_id(&vm).await?;
            let mut vm = c
                .json(Method::POST, &format!("/vms/{id}/stop"), None)
                .await?;
            if wait {
                vm = wait_vm(&c, &vm, Goal::Stopped, timeout).await?;
            }
            show_vm(&api, &vm);
        }
        VmCommand::Move {
            vm,
            to,
            no_start,
            wait,
            timeout,
            api,
        } => {
            let c = Client::new(&api)?;
            let id = c.vm_id(&vm).await?;
            let body = json!({ "to": to, "start": !no_start });
            let mut vm = c
                .json(Method::POST, &format!("/vms/{id}/move"), Some(&body))
                .await?;
            if wait && !no_start {
                vm = wait_vm(&c, &vm, Goal::Running, timeout).await?;
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
            timeout,
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
                vm = wait_vm(&c, &vm, Goal::Running, timeout).await?;
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
            let current = c.json(Method::GET, &path, None).await?;
            let r = if keep_last.is_none() && max_age.is_none() {
                current
            } else {
                let body = merge_retention(&current, keep_last, max_age);
                c.json(Method::PUT, &path, Some(&body)).await?
            };
            if api.json {
                output::json(&r);
            } else {
                show_retention(&r);
            }
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
            logs(&c, &vm, &id, follow, api.json).await?;
        }
    }
    Ok(())
}

/// `vm logs`: the console from the start; with `follow`, new output as it
/// comes until the VM is deleted. JSON: one object for all of it, or with
/// `follow` one object per chunk, one per line.
async fn logs(c: &Client, typed: &str, id: &str, follow: bool, json: bool) -> anyhow::Result<()> {
    let mut offset = 0u64;
    let mut stdout = tokio::io::stdout();
    let mut pending = Vec::new();
    let mut all_text = String::new();
    let mut answered = false;
    loop {
        let resp = match c
            .request(
                Method::GET,
                &format!("/vms/{id}/logs?offset={offset}"),
                None,
            )
            .await
        {
            Ok(r) => r,
            Err(e) if follow && answered && client::is_not_found(&e) => {
                eprintln!("vm '{typed}' was deleted; no more logs");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let next = resp
            .headers()
            .get("x-next-offset")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(offset);
        let bytes = resp.bytes().await?;
        if json {
            let text = utf8_chunk(&mut pending, &bytes);
            if follow {
                if !text.is_empty() {
                    output::json_line(
                        &json!({ "vm": id, "offset": offset, "next_offset": next, "text": text }),
                    );
                }
            } else {
                all_text.push_str(&text);
            }
        } else {
            stdout.write_all(&bytes).await?;
            stdout.flush().await?;
        }
        let caught_up = bytes.is_empty() || next == offset;
        offset = next;
        answered = true;
        if caught_up && !follow {
            break;
        }
        if caught_up {
            // The API has no push channel for console output; poll.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    if json {
        all_text.push_str(&String::from_utf8_lossy(&pending));
        output::json(&json!({ "vm": id, "offset": 0, "next_offset": offset, "text": all_text }));
    }
    Ok(())
}

/// Append `new` to `pending` and take out the text that is complete: a
/// character cut at the end of a chunk waits in `pending` for the next one.
fn utf8_chunk(pending: &mut Vec<u8>, new: &[u8]) -> String {
    pending.extend_from_slice(new);
    let len = pending.len();
    let mut cut = len;
    for i in (len.saturating_sub(3)..len).rev() {
        let b = pending[i];
        if b & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back
        }
        let needed = match b {
            0x00..=0x7F => 1,
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            _ => 4,
        };
        if i + needed > len {
            cut = i;
        }
        break;
    }
    let text = String::from_utf8_lossy(&pending[..cut]).into_owned();
    pending.drain(..cut);
    text
}

/// The body of `PUT /retention`: the current policy with the given limits
/// replaced (`Off` becomes null: unlimited).
fn merge_retention(
    current: &Value,
    keep_last: Option<Limit<u32>>,
    max_age: Option<Limit<Duration>>,
) -> Value {
    let keep = match keep_last {
        None => current["keep_last"].clone(),
        Some(Limit::Off) => Value::Null,
        Some(Limit::On(n)) => n.into(),
    };
    let age = match max_age {
        None => current["max_age_seconds"].clone(),
        Some(Limit::Off) => Value::Null,
        Some(Limit::On(d)) => d.as_secs().into(),
    };
    json!({ "keep_last": keep, "max_age_seconds": age })
}

fn show_retention(r: &Value) {
    let keep = match r["keep_last"].as_u64() {
        Some(n) => n.to_string(),
        None => "none (no limit)".into(),
    };
    let age = match r["max_age_seconds"].as_u64() {
        Some(s) => format!(
            "{s} ({})",
            humantime::format_duration(Duration::from_secs(s))
        ),
        None => "none (no limit)".into(),
    };
    println!("keep_last        {keep}");
    println!("max_age_seconds  {age}");
}

fn show_vm(api: &ApiArgs, vm: &Value) {
    if api.json {
        output::json(vm);
    } else {
        output::record(vm);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Goal {
    /// `running`, and `ready` unless the daemon does not report it.
    Running,
    Stopped,
}

/// States a VM passes through on its way somewhere else.
fn transitional(state: &str) -> bool {
    matches!(
        state,
        "starting" | "restoring" | "stopping" | "snapshotting"
    )
}

/// What one poll of a VM means for a wait.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Done,
    /// Still on the way, in this phase.
    Phase(String),
    Failed(String),
}

/// Judge a polled VM; `moved` tells whether a transitional state was seen
/// (after which a resting state other than the goal means the operation failed).
fn judge(vm: &Value, goal: Goal, moved: bool) -> Seen {
    let state = output::field(vm, "state");
    let reason = || match vm["state_reason"].as_str() {
        Some(r) => format!(": {r}"),
        None => String::new(),
    };
    match (goal, state.as_str()) {
        (Goal::Running, "running") => match vm.get("ready").and_then(Value::as_bool) {
            Some(false) => Seen::Phase("running, waiting for the app to answer".into()),
            _ => Seen::Done,
        },
        (Goal::Stopped, "stopped") => Seen::Done,
        (_, "failed") => Seen::Failed(format!("failed{}", reason())),
        (_, s) if transitional(s) || !moved => Seen::Phase(state.clone()),
        (_, s) => Seen::Failed(format!("ended {s}{}", reason())),
    }
}

/// Poll the VM (as first answered: `vm`) until it reaches `goal`, showing
/// its phases on stderr; fail if it fails or the time is up.
async fn wait_vm(c: &Client, vm: &Value, goal: Goal, timeout: Duration) -> anyhow::Result<Value> {
    let id = output::field(vm, "id");
    let name = output::field(vm, "name");
    let label = if name == "-" || name == id {
        format!("vm {id}")
    } else {
        format!("vm {name} ({id})")
    };
    let mut progress = Progress::new(label);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut vm = vm.clone();
    let mut moved = false;
    loop {
        moved |= transitional(&output::field(&vm, "state"));
        match judge(&vm, goal, moved) {
            Seen::Done => {
                let detail = match (
                    vm.get("ready").and_then(Value::as_bool),
                    vm["boot_ms"].as_u64(),
                ) {
                    (Some(true), Some(ms)) => format!("app answering, boot took {ms} ms"),
                    (Some(true), None) => "app answering".into(),
                    _ => String::new(),
                };
                progress.finish(&output::field(&vm, "state"), &detail);
                return Ok(vm);
            }
            Seen::Failed(what) => bail!("vm '{name}' ({id}) {what}"),
            Seen::Phase(phase) => {
                if tokio::time::Instant::now() > deadline {
                    bail!(
                        "gave up after {} waiting for vm '{name}' ({id}), which is {phase}; it goes on (see `hatch vm get {id}`)",
                        humantime::format_duration(timeout)
                    );
                }
                progress.update(&phase, "", None);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        vm = c.json(Method::GET, &format!("/vms/{id}"), None).await?;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn create_sends_only_what_was_given_and_passes_forks_through() {
        assert_eq!(create_body(None, None, None, None, None, None), json!({}));
        assert_eq!(
            create_body(
                Some("web".into()),
                None,
                Some(2),
                Some(512),
                None,
                Some("snap-abc".into())
            ),
            json!({ "name": "web", "vcpus": 2, "memory_mib": 512, "from_snapshot": "snap-abc" })
        );
    }

    #[test]
    fn waiting_for_running_waits_for_ready_when_the_daemon_reports_it() {
        let vm = |state: &str, ready: Option<bool>| {
            let mut v = json!({ "id": "vm-1", "name": "a", "state": state });
            if let Some(r) = ready {
                v["ready"] = r.into();
            }
            v
        };
        assert_eq!(judge(&vm("running", None), Goal::Running, true), Seen::Done);
        assert_eq!(
            judge(&vm("running", Some(true)), Goal::Running, true),
            Seen::Done
        );
        assert_eq!(
            judge(&vm("running", Some(false)), Goal::Running, true),
            Seen::Phase("running, waiting for the app to answer".into())
        );
        assert_eq!(
            judge(&vm("starting", None), Goal::Running, true),
            Seen::Phase("starting".into())
        );
        // A restore that fails puts the VM back where it was.
        assert_eq!(
            judge(&vm("snapshotted", None), Goal::Running, true),
            Seen::Failed("ended snapshotted".into())
        );
        // ... but before anything moved, a resting state is just the start.
        assert_eq!(
            judge(&vm("stopped", None), Goal::Running, false),
            Seen::Phase("stopped".into())
        );
        let mut failed = vm("failed", None);
        failed["state_reason"] = "qemu exited".into();
        assert_eq!(
            judge(&failed, Goal::Running, true),
            Seen::Failed("failed: qemu exited".into())
        );
        assert_eq!(judge(&vm("stopped", None), Goal::Stopped, true), Seen::Done);
    }

    #[test]
    fn retention_changes_only_the_limits_given() {
        let current = json!({ "keep_last": 3, "max_age_seconds": null });
        assert_eq!(
            merge_retention(&current, None, Some(Limit::On(Duration::from_secs(3600)))),
            json!({ "keep_last": 3, "max_age_seconds": 3600 })
        );
        assert_eq!(
            merge_retention(&current, Some(Limit::Off), None),
            json!({ "keep_last": null, "max_age_seconds": null })
        );
        assert_eq!(
            merge_retention(&json!({}), Some(Limit::On(5)), None),
            json!({ "keep_last": 5, "max_age_seconds": null })
        );
    }

    #[test]
    fn log_text_never_splits_a_character() {
        let mut pending = Vec::new();
        let euro = "€".as_bytes(); // 3 bytes
        assert_eq!(utf8_chunk(&mut pending, &[b'a', euro[0], euro[1]]), "a");
        assert_eq!(pending, &euro[..2]);
        assert_eq!(utf8_chunk(&mut pending, &[euro[2], b'b']), "€b");
        assert!(pending.is_empty());
        // Invalid bytes are replaced, not held.
        assert_eq!(utf8_chunk(&mut pending, &[0xFF, b'c']), "\u{FFFD}c");
        assert_eq!(utf8_chunk(&mut pending, b""), "");
    }
}
