//! Per-VM disks: qcow2 overlays over an image's base disk, so that creating a
//! VM copies nothing and each VM's writes stay its own.

use std::ffi::OsStr;
use std::path::Path;

use tokio::process::Command;

use crate::VmmError;

/// Create `path` as a qcow2 overlay of `base` with the given virtual size.
pub async fn create_overlay(
    base: &Path,
    base_format: &str,
    path: &Path,
    size_mib: u64,
) -> Result<(), VmmError> {
    let size = format!("{size_mib}M");
    qemu_img(
        "qemu-img create",
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            base_format.as_ref(),
            "-b".as_ref(),
            base.as_os_str(),
            path.as_os_str(),
            size.as_ref(),
        ],
    )
    .await
}

/// Point a qcow2 layer at another backing file without touching its data
/// (`qemu-img rebase -u`): the header names the absolute path of wherever
/// the layer was captured.
pub async fn rebase_unsafe(
    layer: &Path,
    backing: &Path,
    backing_format: &str,
) -> Result<(), VmmError> {
    qemu_img(
        "qemu-img rebase",
        &[
            "rebase".as_ref(),
            "-u".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            backing_format.as_ref(),
            "-b".as_ref(),
            backing.as_os_str(),
            layer.as_os_str(),
        ],
    )
    .await
}

/// Write the data of the chain ending in `top` that differs from `base`
/// into a new qcow2 layer `dst` over `base` (`qemu-img convert -B`): the
/// chain's writes in one file of their own, sharing only the image.
pub async fn flatten_onto(
    top: &Path,
    base: &Path,
    base_format: &str,
    dst: &Path,
) -> Result<(), VmmError> {
    qemu_img(
        "qemu-img convert",
        &[
            "convert".as_ref(),
            "-q".as_ref(),
            "-O".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            base_format.as_ref(),
            "-B".as_ref(),
            base.as_os_str(),
            top.as_os_str(),
            dst.as_os_str(),
        ],
    )
    .await
}

/// Run `qemu-img` with an empty environment but `PATH`: the daemon's
/// environment holds secrets (API key, S3 credentials) that a child has no
/// business seeing.
async fn qemu_img(tool: &'static str, args: &[&OsStr]) -> Result<(), VmmError> {
    let out = Command::new("qemu-img")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()
        .await
        .map_err(|source| VmmError::Exec {
            program: "qemu-img".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(VmmError::Tool {
            tool,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}
