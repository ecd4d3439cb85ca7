//! Image commands work on the images directory directly: building needs no
//! daemon, and the daemon reads images from disk at each VM creation.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use hatch_image::{BuildOptions, Image, ImageStore};

use crate::client::{ApiArgs, Client};
use crate::output;

#[derive(Args)]
pub struct StoreArgs {
    /// The daemon's images directory [default: <data-dir>/images].
    #[arg(long, env = "HATCH_IMAGES_DIR")]
    images_dir: Option<PathBuf>,
    /// The daemon's data directory, used to find the images directory
    /// [default: ~/.local/share/hatch].
    #[arg(long, env = "HATCH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

impl StoreArgs {
    /// The images directory these flags mean (as `hatch serve` picks it).
    fn dir(&self) -> anyhow::Result<PathBuf> {
        images_dir(
            self.images_dir.clone(),
            self.data_dir.clone(),
            std::env::var_os("HOME"),
        )
    }

    fn open(&self) -> anyhow::Result<ImageStore> {
        let dir = self.dir()?;
        ImageStore::open(&dir).with_context(|| format!("opening images dir {}", dir.display()))
    }
}

/// `--images-dir`, else `<data-dir>/images`, else
/// `~/.local/share/hatch/images` (the daemon's default data dir).
fn images_dir(
    images_dir: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    home: Option<OsString>,
) -> anyhow::Result<PathBuf> {
    if let Some(d) = images_dir {
        return Ok(d);
    }
    let data = match (data_dir, home) {
        (Some(d), _) => d,
        (None, Some(h)) => PathBuf::from(h).join(".local/share/hatch"),
        (None, None) => {
            anyhow::bail!(
                "HOME is not set: pass --images-dir or --data-dir (or set HATCH_IMAGES_DIR / HATCH_DATA_DIR)"
            )
        }
    };
    Ok(data.join("images"))
}

/// The second images directory the daemon looks in:
/// `--image-cache-dir`, else `$HATCH_CACHE_DIR/images`, else
/// `~/.cache/hatch/images` (where the set-up scripts build the default image).
fn image_cache_dir(
    flag: Option<PathBuf>,
    cache_dir: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    if flag.is_some() {
        return flag;
    }
    let cache = cache_dir
        .filter(|c| !c.is_empty())
        .map(PathBuf::from)
        .or_else(|| home.map(|h| PathBuf::from(h).join(".cache/hatch")))?;
    Some(cache.join("images"))
}

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Build the default image: Debian cloud kernel, busybox initramfs, demo app.
    Build {
        #[command(flatten)]
        store: StoreArgs,
        /// Downloads and extracted kernel packages are cached here
        /// [default: ~/.cache/hatch].
        #[arg(long, env = "HATCH_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
        /// The statically linked guest binary [default: hatch-guest next to this program].
        #[arg(long)]
        guest_bin: Option<PathBuf>,
        /// Base disk size in MiB.
        #[arg(long, default_value_t = 1024)]
        disk_mib: u64,
        /// Name to register the image under.
        #[arg(long, default_value = "default")]
        name: String,
        /// Rebuild even if the image is up to date.
        #[arg(long)]
        force: bool,
    },
    /// List the images the daemon can boot: those in its images directory,
    /// then those in the image cache (a name found in both is taken from the
    /// images directory; the other is shown as shadowed).
    #[command(alias = "ls")]
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// The daemon's second images directory [default:
        /// $HATCH_CACHE_DIR/images, else ~/.cache/hatch/images].
        #[arg(long, env = "HATCH_IMAGE_CACHE_DIR")]
        image_cache_dir: Option<PathBuf>,
    },
    /// Import a container image through the daemon: an OCI archive
    /// (`podman save --format oci-archive`, `skopeo copy ... oci-archive:`)
    /// or a `docker save` archive, linux/amd64. VMs created with
    /// `--image NAME` run its command.
    Import {
        /// Name for the image.
        name: String,
        /// The archive (.tar).
        file: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete an imported image (refused while a VM uses it).
    #[command(alias = "delete")]
    Rm {
        /// The image's name.
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Register your own image: kernel, initrd and root disk (raw or qcow2).
    Register {
        /// Name to register the image under (used by `hatch vm create --image`).
        name: String,
        /// The kernel (bzImage).
        #[arg(long)]
        kernel: PathBuf,
        /// The initrd.
        #[arg(long)]
        initrd: PathBuf,
        /// The root disk, raw or qcow2 (VMs get a copy-on-write overlay on it).
        #[arg(long)]
        disk: PathBuf,
        /// Kernel command line [default: console=ttyS0].
        #[arg(long)]
        cmdline: Option<String>,
        /// The image runs Hatch's guest agent (`hatch-guest`): restores set
        /// its clock and reseed its RNG, and fail if it does not confirm
        /// [default: no agent].
        #[arg(long)]
        agent: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
}

pub async fn run(cmd: ImageCommand) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Import { name, file, api } => {
            let client = Client::new(&api)?;
            let path = format!("/images?name={name}");
            let image = client.upload(&path, &file).await?;
            let app = &image["app"];
            let ports: Vec<String> = app["exposed_ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| p.to_string())
                .collect();
            println!(
                "imported image '{name}' ({} MiB disk); runs {}; exposes {}",
                image["disk_mib"],
                app["entrypoint"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .chain(app["cmd"].as_array().into_iter().flatten())
                    .filter_map(|a| a.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
                if ports.is_empty() {
                    "no ports".to_string()
                } else {
                    ports.join(", ")
                }
            );
        }
        ImageCommand::Rm { name, api } => {
            let client = Client::new(&api)?;
            client
                .json(reqwest::Method::DELETE, &format!("/images/{name}"), None)
                .await?;
            println!("deleted image '{name}'");
        }
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
        ImageCommand::List {
            store,
            image_cache_dir: cache_flag,
        } => {
            let mut dirs = vec![store.dir()?];
            if let Some(cache) = image_cache_dir(
                cache_flag,
                std::env::var_os("HATCH_CACHE_DIR"),
                std::env::var_os("HOME"),
            ) && !same_dir(&cache, &dirs[0])
            {
                dirs.push(cache);
            }
            let mut listed = Vec::new();
            for dir in &dirs {
                // Listing creates nothing: a missing directory holds no images.
                if !dir.is_dir() {
                    continue;
                }
                let images = ImageStore::open(dir)
                    .and_then(|s| s.list())
                    .with_context(|| format!("listing images in {}", dir.display()))?;
                for image in images {
                    let shadowed = listed
                        .iter()
                        .any(|(i, _, _): &(Image, _, _)| i.name == image.name);
                    listed.push((image, dir.clone(), shadowed));
                }
            }
            if store.json {
                let mut out = Vec::new();
                for (image, dir, shadowed) in &listed {
                    let mut v = serde_json::to_value(image)?;
                    v["dir"] = dir.display().to_string().into();
                    v["shadowed"] = (*shadowed).into();
                    out.push(v);
                }
                output::json(&serde_json::Value::Array(out));
                return Ok(());
            }
            if listed.is_empty() {
                let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
                eprintln!(
                    "no images in {}; build the default one with `hatch image build`",
                    looked.join(" or ")
                );
                return Ok(());
            }
            let rows = listed
                .iter()
                .map(|(i, dir, shadowed)| {
                    vec![
                        i.name.clone(),
                        format!("{} MiB", i.disk_mib),
                        i.disk_format.clone(),
                        i.created_at.clone(),
                        if *shadowed {
                            format!("{} (shadowed)", dir.display())
                        } else {
                            dir.display().to_string()
                        },
                    ]
                })
                .collect();
            output::table(&["NAME", "DISK", "FORMAT", "CREATED", "DIR"], rows);
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

fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn images_dir_defaults_to_the_daemons_default_data_dir() {
        assert_eq!(
            images_dir(Some("/i".into()), Some("/d".into()), Some("/h".into())).unwrap(),
            PathBuf::from("/i")
        );
        assert_eq!(
            images_dir(None, Some("/d".into()), Some("/h".into())).unwrap(),
            PathBuf::from("/d/images")
        );
        assert_eq!(
            images_dir(None, None, Some("/h".into())).unwrap(),
            PathBuf::from("/h/.local/share/hatch/images")
        );
        assert!(images_dir(None, None, None).is_err());
    }

    #[test]
    fn image_cache_defaults_to_the_users_cache() {
        assert_eq!(
            image_cache_dir(None, None, Some("/h".into())),
            Some(PathBuf::from("/h/.cache/hatch/images"))
        );
        assert_eq!(
            image_cache_dir(None, Some("/c".into()), Some("/h".into())),
            Some(PathBuf::from("/c/images"))
        );
        assert_eq!(
            image_cache_dir(Some("/x".into()), Some("/c".into()), None),
            Some(PathBuf::from("/x"))
        );
        assert_eq!(image_cache_dir(None, None, None), None);
    }
}
