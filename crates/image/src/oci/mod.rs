//! Container images as VM root disks: an OCI image layout archive
//! (`podman save --format oci-archive`, `skopeo copy ... oci-archive:`) or a
//! `docker save` archive, single platform linux/amd64, is unpacked layer by
//! layer (whiteouts and opaque directories applied) into a root file system,
//! and its config (entrypoint, command, environment, working dir, user,
//! exposed ports) is kept as an [`AppConfig`]. Every blob is checked
//! against its digest before it is used; anything not supported is refused
//! with a clear error.

mod archive;
mod config;
mod layers;

use std::path::{Path, PathBuf};

pub use config::AppConfig;

use crate::ImageError;

/// What an archive holds, unpacked.
#[derive(Debug)]
pub struct Unpacked {
    /// The root file system, all layers applied.
    pub rootfs: PathBuf,
    pub app: AppConfig,
    /// Bytes of the files in `rootfs` (for sizing its disk).
    pub bytes: u64,
    /// The digests of the layers applied, in order.
    pub layers: Vec<String>,
}

/// Unpack `archive` below `work` (a scratch directory the caller removes).
pub fn unpack(archive: &Path, work: &Path) -> Result<Unpacked, ImageError> {
    let staged = work.join("archive");
    archive::extract(archive, &staged)?;
    let image = archive::read_image(&staged)?;
    let rootfs = work.join("rootfs");
    std::fs::create_dir_all(&rootfs)
        .map_err(|e| ImageError::io(format!("creating {}", rootfs.display()), e))?;
    let mut applied = Vec::new();
    for layer in &image.layers {
        layers::apply(layer, &rootfs)?;
        applied.push(layer.digest.clone());
    }
    let bytes = layers::disk_usage(&rootfs)?;
    Ok(Unpacked {
        rootfs,
        app: image.app,
        bytes,
        layers: applied,
    })
}

#[cfg(test)]
mod tests;

fn invalid(msg: impl Into<String>) -> ImageError {
    ImageError::InvalidInput(msg.into())
}
