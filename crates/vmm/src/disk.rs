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
    let out = Command::new("qemu-img")
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
