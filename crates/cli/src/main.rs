//! `hatch`: runs the daemon (`hatch serve`), builds guest images, and talks to
//! the daemon's API for everything else.

mod client;
mod commands;
mod output;
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
    Serve(serve::ServeArgs),
    /// Create, inspect and control VMs.
    #[command(subcommand)]
    Vm(commands::vm::VmCommand),
    /// Save VM state to S3 and list, inspect or delete snapshots.
    #[command(subcommand)]
    Snapshot(commands::snapshot::SnapshotCommand),
    /// S3 space used by snapshots, in total and per VM.
    Storage {
        #[command(flatten)]
        api: client::ApiArgs,
    },
    /// Route host names to VMs through the proxy.
    #[command(subcommand)]
    Route(commands::route::RouteCommand),
    /// List, create and revoke API keys.
    #[command(subcommand)]
    Key(commands::key::KeyCommand),
    /// Build and register guest images (local; no daemon needed).
    #[command(subcommand)]
    Image(commands::image::ImageCommand),
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
            Command::Serve(args) => serve::run(args).await,
            Command::Vm(cmd) => commands::vm::run(cmd).await,
            Command::Route(cmd) => commands::route::run(cmd).await,
            Command::Key(cmd) => commands::key::run(cmd).await,
            Command::Snapshot(cmd) => commands::snapshot::run(cmd).await,
            Command::Storage { api } => commands::vm::storage(api).await,
            Command::Image(cmd) => commands::image::run(cmd),
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
