//! Builds the default image by hand:
//! `cargo run -p hatch-image --example build_default -- IMAGES_DIR CACHE_DIR GUEST_BIN [DISK_MIB] [--force]`

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let force = args.iter().any(|a| a == "--force");
    let pos: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    if pos.len() < 3 {
        eprintln!("usage: build_default IMAGES_DIR CACHE_DIR GUEST_BIN [DISK_MIB] [--force]");
        return ExitCode::from(2);
    }
    let disk_mib = match pos.get(3).map(|s| s.parse::<u64>()) {
        None => 1024,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("bad DISK_MIB: {e}");
            return ExitCode::from(2);
        }
    };
    let result = hatch_image::ImageStore::open(pos[0].as_str()).and_then(|store| {
        let opts = hatch_image::BuildOptions {
            name: "default".into(),
            cache_dir: PathBuf::from(pos[1]),
            guest_bin: PathBuf::from(pos[2]),
            disk_mib,
            force,
        };
        hatch_image::build_default(&store, &opts)
    });
    match result {
        Ok(img) => match serde_json::to_string_pretty(&img) {
            Ok(s) => {
                println!("{s}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
