//! Image commands work on the images directory directly: building needs no
//! daemon, and the daemon reads images from disk at each VM creation.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use hatch_image::{BuildOptions, ImageStore};

use crate::output;

#[derive(Args)]
pub struct StoreArgs {
    /// The daemon's images directory (default <data-dir>/images).
    #[arg(long, env = "HATCH_IMAGES_DIR")]
    images_dir: Option<PathBuf>,
    /// The daemon's data directory, used to find the images directory.
    #[arg(long, env = "HATCH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

impl StoreArgs {
    fn open(&self) -> anyhow::Result<ImageStore> {
        let dir = match (&self.images_dir, &self.data_dir) {
            (Some(d), _) => d.clone(),
            (None, Some(data)) => data.join("images"),
            (None, None) => anyhow::bail!(
                "pass --images-dir or --data-dir (or set HATCH_IMAGES_DIR / HATCH_DATA_DIR)"
            ),
        };
        ImageStore::open(&dir).with_context(|| format!("opening images dir {}", dir.display()))
    }
}

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Build the default image: Debian cloud kernel, busybox initramfs, demo app.
    Build {
        #[command(flatten)]
        store: StoreArgs,
        /// Downloads and extracted kernel packages are cached here.
        #[arg(long, env = "HATCH_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
        /// The statically linked guest binary (default: hatch-guest next to this program).
        #[arg(long)]
        guest_bin: Option<PathBuf>,
        /// Base disk size in MiB.
        #[arg(long, default_value_t = 1024)]
        disk_mib: u64,
        #[arg(long, default_value = "default")]
        name: String,
        /// Rebuild even if the image is up to date.
        #[arg(long)]
        force: bool,
    },
    /// List images.
    #[command(alias = "ls")]
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Register your own image: kernel, initrd and root disk (raw or qcow2).
    Register {
        name: String,
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long)]
        initrd: PathBuf,
        #[arg(long)]
        disk: PathBuf,
        /// Kernel command line (default: console=ttyS0).
        #[arg(long)]
        cmdline: Option<String>,
        /// The image runs Hatch's guest agent (`hatch-guest`): restores set
        /// its clock and reseed its RNG, and fail if it does not confirm.
        #[arg(long)]
        agent: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
}

pub fn run(cmd: ImageCommand) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Build {
            store,
            cache_dir,
            guest_bin,
            disk_mib,
            name,
            force,
        } => {
            let images = store.open()?;
            let cache_dir = match cache_dir {
                Some(d) => d,
                None => default_cache_dir()?,
            };
            let guest_bin = match guest_bin {
                Some(p) => p,
                None => std::env::current_exe()
                    .context("locating this program")?
                    .with_file_name("hatch-guest"),
            };
            let image = hatch_image::build_default(
                &images,
                &BuildOptions {
                    name,
                    cache_dir,
                    guest_bin,
                    disk_mib,
                    force,
                },
            )?;
            print_image(store.json, &image);
        }
        ImageCommand::List { store } => {
            let images = store.open()?.list()?;
            if store.json {
                output::json(&serde_json::to_value(&images)?);
                return Ok(());
            }
            let rows = images
                .iter()
                .map(|i| {
                    vec![
                        i.name.clone(),
                        format!("{} MiB", i.disk_mib),
                        i.disk_format.clone(),
                        i.created_at.clone(),
                    ]
                })
                .collect();
            output::table(&["NAME", "DISK", "FORMAT", "CREATED"], rows);
        }
        ImageCommand::Register {
            name,
            kernel,
            initrd,
            disk,
            cmdline,
            agent,
            store,
        } => {
            let image = store.open()?.register(
                &name,
                &kernel,
                &initrd,
                &disk,
                cmdline.as_deref(),
                agent,
            )?;
            print_image(store.json, &image);
        }
    }
    Ok(())
}

fn print_image(json: bool, image: &hatch_image::Image) {
    let v = serde_json::to_value(image).unwrap_or_default();
    if json {
        output::json(&v);
    } else {
        output::record(&v);
    }
}

fn default_cache_dir() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set; pass --cache-dir")?;
    Ok(PathBuf::from(home).join(".cache/hatch"))
}
