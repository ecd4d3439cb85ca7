//! Disk chain compaction. Every restore puts a new active qcow2 layer over
//! the snapshot's frozen ones, so a VM woken again and again grows a long
//! chain: slower to open, slower to read, and one more file to fetch per
//! layer on a restore from S3. Past `max_disk_layers`, the chain is
//! flattened live with QEMU's `block-stream` (the layers' data is copied
//! into the active layer, which then sits directly on the image), and layer
//! files no snapshot needs any more are removed.

use std::sync::Arc;

use crate::manager::VmManager;

/// Longest a flattening may take (it copies the VM's written disk data)
/// before it is cancelled and the chain kept.
const STREAM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);
use crate::model::VmState;
use crate::supervisor::VmSupervisor;

impl VmManager {
    /// After a restore: flatten the VM's disk chain in the background if it
    /// is longer than the limit. Holds the VM's operation lock meanwhile
    /// (a capture cannot switch layers during a stream job).
    pub(crate) fn compact_disk_if_long(self: &Arc<Self>, rt: Arc<VmSupervisor>) {
        let this = self.clone();
        self.tasks.spawn(async move {
            if !this.disk_chain_is_long(&rt.id).await {
                return;
            }
            let _guard = rt.begin("disk compaction").await;
            if rt.state() != VmState::Running || !this.disk_chain_is_long(&rt.id).await {
                return;
            }
            if let Err(e) = this.compact_disk(&rt).await {
                tracing::warn!(vm = %rt.id, error = format!("{e:#}"), "disk compaction failed; the chain stays as it was");
            }
        });
    }

    async fn disk_chain_is_long(&self, vm_id: &str) -> bool {
        self.store
            .disk_layers(vm_id)
            .await
            .is_ok_and(|l| l.len() > self.cfg.max_disk_layers)
    }

    async fn compact_disk(&self, rt: &VmSupervisor) -> anyhow::Result<()> {
        let Some(machine) = rt.machine() else {
            return Ok(());
        };
        let layers = self.store.disk_layers(&rt.id).await?;
        let Some(top) = layers.last().cloned() else {
            return Ok(());
        };
        let vm = self.get(&rt.id).await?;
        let image = self.images.get(&vm.image)?;
        let started = std::time::Instant::now();
        machine
            .stream_disk(&super::node_name(&top), &image.disk, STREAM_TIMEOUT)
            .await?;
        // Recorded only once QEMU finished: until then the chain on disk
        // and in the database is the old one, intact.
        self.store
            .set_disk_layers(&rt.id, std::slice::from_ref(&top), &self.cfg.node_name)
            .await?;
        tracing::info!(vm = %rt.id, from_layers = layers.len(),
            ms = started.elapsed().as_millis() as u64, "disk chain compacted");
        self.prune_layers(&rt.id).await?;
        Ok(())
    }
}
