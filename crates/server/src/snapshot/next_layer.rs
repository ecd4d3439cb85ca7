//! The disk layer a wake will write to, made ahead of need: a suspend
//! creates it (`qemu-img create`, ~15 ms) once the capture is done, so that
//! the next wake from the local copy does not wait for it.
//!
//! `<vm>/next-layer.json` names it with what it was made for (the frozen
//! top layer it is backed by, the disk size); a wake uses it only if both
//! still hold and the file is there, and makes one as before otherwise. A
//! layer left unused is a stray file that compaction removes like any
//! other.

use serde::{Deserialize, Serialize};

use super::names::{is_layer_name, new_layer_name};
use crate::durable;
use crate::manager::VmManager;

const RECORD: &str = "next-layer.json";

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct NextLayer {
    name: String,
    top: String,
    disk_mib: u64,
}

impl NextLayer {
    /// Made for a wake over `top` with a disk of `disk_mib`, and there.
    fn fits(&self, dir: &std::path::Path, top: &str, disk_mib: u64) -> bool {
        is_layer_name(&self.name)
            && self.name != top
            && self.top == top
            && self.disk_mib == disk_mib
            && dir.join(&self.name).is_file()
    }
}

impl VmManager {
    /// Make the layer the next wake of the VM, whose frozen top layer is
    /// `top`, will write to.
    pub(super) async fn prepare_next_layer(
        &self,
        vm_id: &str,
        top: &str,
        disk_mib: u64,
    ) -> anyhow::Result<()> {
        let dir = self.paths(vm_id).dir;
        let _ = std::fs::remove_file(dir.join(RECORD));
        let name = new_layer_name();
        hatch_vmm::disk::create_overlay(&dir.join(top), "qcow2", &dir.join(&name), disk_mib)
            .await?;
        self.record_next_layer(vm_id, &name, top, disk_mib)
    }

    /// Name `name`, a layer over `top` made for a disk of `disk_mib` (by
    /// [`VmManager::prepare_next_layer`], or by the QEMU a suspend kept
    /// warm), as the one the next wake writes to.
    pub(super) fn record_next_layer(
        &self,
        vm_id: &str,
        name: &str,
        top: &str,
        disk_mib: u64,
    ) -> anyhow::Result<()> {
        let record = self.paths(vm_id).dir.join(RECORD);
        let next = NextLayer {
            name: name.to_string(),
            top: top.to_string(),
            disk_mib,
        };
        let part = durable::partial(&record);
        std::fs::write(&part, serde_json::to_vec(&next)?)?;
        std::fs::rename(&part, &record)?;
        Ok(())
    }

    /// The layer made ahead for a wake over `top` with a disk of
    /// `disk_mib`, if there is one that fits; the record is used up either
    /// way.
    pub(super) fn take_next_layer(&self, vm_id: &str, top: &str, disk_mib: u64) -> Option<String> {
        let dir = self.paths(vm_id).dir;
        let record = dir.join(RECORD);
        let bytes = std::fs::read(&record).ok()?;
        let _ = std::fs::remove_file(&record);
        let next: NextLayer = serde_json::from_slice(&bytes).ok()?;
        if !next.fits(&dir, top, disk_mib) {
            if is_layer_name(&next.name) && next.name != top {
                let _ = std::fs::remove_file(dir.join(&next.name));
            }
            return None;
        }
        Some(next.name)
    }

    /// The layer [`VmManager::take_next_layer`] would return, left in
    /// place (a standby QEMU opens it ahead of the wake; an inactive qcow2
    /// is not written to, so the wake finds it as it was made).
    pub(super) fn peek_next_layer(&self, vm_id: &str, top: &str, disk_mib: u64) -> Option<String> {
        let dir = self.paths(vm_id).dir;
        let bytes = std::fs::read(dir.join(RECORD)).ok()?;
        let next: NextLayer = serde_json::from_slice(&bytes).ok()?;
        next.fits(&dir, top, disk_mib).then_some(next.name)
    }
}
