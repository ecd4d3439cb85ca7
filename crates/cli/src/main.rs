//! `hatch`: runs the daemon (`hatch serve`), builds guest images, and talks to
//! the daemon's API for everything else.

mod client;
mod commands;
mod output;
mod parse;
mod progress;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "hatch",
    version,
    about = "MicroVMs that sleep in S3 and wake on HTTP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: API, proxy and VMs.
    Serve(Box<serve::ServeArgs>),
    /// Create, inspect and control VMs.
    #[command(subcommand)]
    Vm(commands::vm::VmCommand),
    /// Save VM state to S3 and list, inspect or delete snapshots.
    #[command(subcommand)]
    Snapshot(commands::snapshot::SnapshotCommand),
    /// S3 space used by snapshots (`hatch storage` alone, or `usage`), and
    /// garbage collection of unreferenced chunks (`gc`).
    Storage(commands::storage::StorageArgs),
    /// Route host names to VMs through the proxy.
    #[command(subcommand)]
    Route(commands::route::RouteCommand),
    /// List, create and revoke API keys.
    #[command(subcommand)]
    Key(commands::key::KeyCommand),
    /// The daemons of a cluster.
    #[command(subcommand)]
    Node(commands::node::NodeCommand),
    /// Build and register guest images (local; no daemon needed), import
    /// container images and delete them (through the daemon).
    #[command(subcommand)]
    Image(commands::image::ImageCommand),
    /// Serve a woken VM's memory from S3 on demand (started by the daemon).
    #[command(hide = true)]
    Lazyram {
        /// The spec the daemon wrote (read once, then removed).
        #[arg(long)]
        spec: std::path::PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(*args).await,
            Command::Vm(cmd) => commands::vm::run(cmd).await,
            Command::Route(cmd) => commands::route::run(cmd).await,
            Command::Key(cmd) => commands::key::run(cmd).await,
            Command::Node(cmd) => commands::node::run(cmd).await,
            Command::Snapshot(cmd) => commands::snapshot::run(cmd).await,
            Command::Storage(args) => commands::storage::run(args).await,
            Command::Image(cmd) => commands::image::run(cmd).await,
            Command::Lazyram { spec } => {
                tracing_subscriber::fmt()
                    .with_writer(std::io::stderr)
                    .with_ansi(false)
                    .with_env_filter(
                        tracing_subscriber::EnvFilter::try_from_env("HATCH_LOG")
                            .unwrap_or_else(|_| "info".into()),
                    )
                    .init();
                hatch_server::snapshot::lazy::run_process(&spec).await
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::CommandFactory;

    /// Every argument of `cmd` and its subcommands, with the command path.
    fn walk(cmd: &clap::Command, path: &str, out: &mut Vec<(String, clap::Arg)>) {
        for arg in cmd.get_arguments() {
            out.push((path.to_string(), arg.clone()));
        }
        for sub in cmd.get_subcommands() {
            walk(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    fn help_of(arg: &clap::Arg) -> String {
        arg.get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn every_argument_has_help_and_every_optional_value_a_default() {
        let mut args = Vec::new();
        walk(&Cli::command(), "hatch", &mut args);
        assert!(args.len() > 50, "walked only {} arguments", args.len());
        let mut missing = Vec::new();
        for (path, arg) in &args {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let help = help_of(arg);
            if help.trim().is_empty() {
                missing.push(format!("{path} {id}: no help"));
                continue;
            }
            // An option that takes a value and may be left out says what
            // happens then: a clap default, or "[default: ...]" in its help.
            let takes_value = arg.get_num_args().is_some_and(|n| n.takes_values())
                || !matches!(
                    arg.get_action(),
                    clap::ArgAction::SetTrue | clap::ArgAction::SetFalse | clap::ArgAction::Count
                );
            let optional = !arg.is_required_set() && !arg.is_positional();
            if takes_value
                && optional
                && arg.get_default_values().is_empty()
                && !help.contains("default")
            {
                missing.push(format!("{path} --{id}: no default shown"));
            }
        }
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }

    #[test]
    fn clap_accepts_the_command_tree() {
        Cli::command().debug_assert();
    }

    #[test]
    fn storage_alone_shows_usage_and_gc_takes_the_api_flags() {
        let Command::Storage(args) = Cli::try_parse_from(["hatch", "storage", "--json"])
            .unwrap()
            .command
        else {
            panic!("not storage");
        };
        assert!(args.command.is_none() && args.api.json);
        let Command::Storage(args) =
            Cli::try_parse_from(["hatch", "storage", "gc", "--json", "--api", "127.0.0.1:1"])
                .unwrap()
                .command
        else {
            panic!("not storage");
        };
        assert!(matches!(
            args.command,
            Some(commands::storage::StorageCommand::Gc)
        ));
        assert!(args.api.json);
        assert_eq!(args.api.api, "127.0.0.1:1");
        assert!(Cli::try_parse_from(["hatch", "storage", "nope"]).is_err());
    }
}
