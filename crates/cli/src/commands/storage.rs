//! `hatch storage`: S3 space used by snapshots, and garbage collection.

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::Value;

use crate::client::{ApiArgs, Client};
use crate::output;

#[derive(Args)]
pub struct StorageArgs {
    #[command(subcommand)]
    pub command: Option<StorageCommand>,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Subcommand)]
pub enum StorageCommand {
    /// S3 space used by snapshots, in total and per VM; local copies and
    /// uploads (what `hatch storage` alone shows).
    Usage,
    /// Delete chunks in S3 that no snapshot references any more, and say
    /// what was kept and why.
    Gc,
}

pub async fn run(args: StorageArgs) -> anyhow::Result<()> {
    match args.command.unwrap_or(StorageCommand::Usage) {
        StorageCommand::Usage => usage(&args.api).await,
        StorageCommand::Gc => gc(&args.api).await,
    }
}

async fn gc(api: &ApiArgs) -> anyhow::Result<()> {
    let c = Client::new(api)?;
    let report = c.json(Method::POST, "/storage/gc", None).await?;
    if api.json {
        output::json(&report);
    } else {
        println!("{}", gc_summary(&report));
    }
    Ok(())
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// "deleted 12 chunks (34.5 MiB); kept 40 chunks referenced by 3 manifests
/// and 5 unreferenced chunks younger than the grace period (3600 s,
/// HATCH_GC_GRACE_SECONDS)"
pub fn gc_summary(r: &Value) -> String {
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    let (chunks, deleted, young) = (n("chunks"), n("deleted_chunks"), n("kept_young"));
    let referenced = chunks.saturating_sub(deleted).saturating_sub(young);
    let grace = match r["grace_seconds"].as_u64() {
        Some(s) => format!("{s} s, HATCH_GC_GRACE_SECONDS"),
        None => "HATCH_GC_GRACE_SECONDS".into(),
    };
    format!(
        "deleted {} ({}); kept {} referenced by {} and {} younger than the grace period ({grace})",
        plural(deleted, "chunk", "chunks"),
        output::bytes(n("freed_bytes")),
        plural(referenced, "chunk", "chunks"),
        plural(n("manifests"), "manifest", "manifests"),
        plural(young, "unreferenced chunk", "unreferenced chunks"),
    )
}

async fn usage(api: &ApiArgs) -> anyhow::Result<()> {
    let c = Client::new(api)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn gc_says_what_it_deleted_and_why_it_kept_the_rest() {
        let r = json!({
            "manifests": 3, "chunks": 57, "deleted_chunks": 12,
            "freed_bytes": 34 * 1048576 + 524288, "kept_young": 5, "grace_seconds": 3600
        });
        assert_eq!(
            gc_summary(&r),
            "deleted 12 chunks (34.5 MiB); kept 40 chunks referenced by 3 manifests and 5 unreferenced chunks younger than the grace period (3600 s, HATCH_GC_GRACE_SECONDS)"
        );
        let r = json!({
            "manifests": 1, "chunks": 1, "deleted_chunks": 0, "freed_bytes": 0, "kept_young": 0
        });
        assert_eq!(
            gc_summary(&r),
            "deleted 0 chunks (0 B); kept 1 chunk referenced by 1 manifest and 0 unreferenced chunks younger than the grace period (HATCH_GC_GRACE_SECONDS)"
        );
    }
}
