//! Per-VM disks: qcow2 overlays over an image's base disk, so that creating a
//! VM copies nothing and each VM's writes stay its own.

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
    let out = qemu_img()
        .arg("create")
        .args(["-q", "-f", "qcow2", "-F", base_format, "-b"])
        .arg(base)
        .arg(path)
        .arg(format!("{size_mib}M"))
        .output()
        .await
        .map_err(|source| VmmError::Exec {
            program: "qemu-img".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(VmmError::Tool {
            tool: "qemu-img create",
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Point a qcow2 layer at another backing file without touching its data
/// (`qemu-img rebase -u`): the header names the absolute path of wherever
/// the layer was captured.
pub async fn rebase_unsafe(
    layer: &Path,
    backing: &Path,
    backing_format: &str,
) -> Result<(), VmmError> {
    let out = qemu_img()
        .args(["rebase", "-u", "-f", "qcow2", "-F", backing_format, "-b"])
        .arg(backing)
        .arg(layer)
        .output()
        .await
        .map_err(|source| VmmError::Exec {
            program: "qemu-img".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(VmmError::Tool {
            tool: "qemu-img rebase",
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// `qemu-img` with an empty environment but `PATH`: the daemon's
/// environment holds secrets (API key, S3 credentials) that a child has no
/// business seeing.
fn qemu_img() -> Command {
    let mut c = Command::new("qemu-img");
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    c
}
