//! Saving and loading a machine's CPU and device state.
//!
//! Guest RAM is a shared file (memory-backend-file, share=on), and the
//! `x-ignore-shared` migration capability leaves it out of the migration
//! stream: what is saved is only CPU and device state (~60 KiB), written in
//! milliseconds. The RAM file itself is the memory image. The same capability
//! must be on for the incoming side of a restore, which then maps the RAM file
//! instead of reading memory from the stream.

use std::path::Path;
use std::time::Duration;

use tokio::sync::broadcast;

use hatch_qmp::commands::{
    BlockJobCancel, BlockStream, BlockdevSnapshotSync, Cont, MigrateIncoming,
    MigrateSetCapabilities, MigrateSetParameters, MigrationCapability, QueryBlock, QueryBlockJobs,
    QueryChardev, QueryMigrate, QueryStatus, Stop,
};

use crate::spec::AGENT_CHARDEV;
use crate::{Machine, VmmError};

/// Longest a state save or load may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

const TIMED_OUT: &str = "timed out";

/// Migration bandwidth cap: effectively none (the default 128 MiB/s
/// throttles even a paused VM).
const MAX_BANDWIDTH: u64 = 64 << 30;

impl Machine {
    pub async fn pause(&self) -> Result<(), VmmError> {
        self.command(&Stop).await?;
        Ok(())
    }

    pub async fn resume(&self) -> Result<(), VmmError> {
        self.command(&Cont).await?;
        Ok(())
    }

    async fn set_migration(&self, ignore_shared: bool) -> Result<(), VmmError> {
        self.command(&MigrateSetCapabilities {
            capabilities: vec![
                MigrationCapability {
                    capability: "x-ignore-shared".into(),
                    state: ignore_shared,
                },
                // MIGRATION events wake `wait_migration`.
                MigrationCapability {
                    capability: "events".into(),
                    state: true,
                },
            ],
        })
        .await?;
        self.command(&MigrateSetParameters {
            max_bandwidth: MAX_BANDWIDTH,
        })
        .await?;
        Ok(())
    }

    /// Write CPU and device state (not RAM) to `path`. The caller has paused
    /// the machine. Afterwards QEMU's block devices are inactive until `cont`.
    pub async fn save_state(&self, path: &Path) -> Result<(), VmmError> {
        self.save_to(path, true).await
    }

    /// The plain way (a benchmark baseline): RAM goes into the stream too.
    pub async fn migrate_to_file(&self, path: &Path) -> Result<(), VmmError> {
        self.save_to(path, false).await
    }

    async fn save_to(&self, path: &Path, ignore_shared: bool) -> Result<(), VmmError> {
        self.set_migration(ignore_shared).await?;
        let uri = format!("exec:cat > {}", shell_quote(path));
        self.command(&hatch_qmp::commands::Migrate { uri }).await?;
        self.wait_migration().await
    }

    /// Load CPU and device state from `path` into a machine launched with
    /// `incoming`, and let it run.
    pub async fn load_state(&self, path: &Path) -> Result<(), VmmError> {
        self.load_from(path, true).await
    }

    /// Load a stream written by [`Machine::migrate_to_file`].
    pub async fn migrate_from_file(&self, path: &Path) -> Result<(), VmmError> {
        self.load_from(path, false).await
    }

    /// Errors before the incoming migration completed are
    /// [`VmmError::StateRejected`] (QEMU starts the guest only once it has
    /// loaded everything), except a timeout, after which nobody knows.
    async fn load_from(&self, path: &Path, ignore_shared: bool) -> Result<(), VmmError> {
        let uri = format!("exec:cat {}", shell_quote(path));
        let incoming = async {
            self.set_migration(ignore_shared).await?;
            self.command(&MigrateIncoming { uri }).await?;
            self.wait_migration().await
        };
        match incoming.await {
            Ok(()) => {}
            Err(VmmError::Migration(m)) if m == TIMED_OUT => return Err(VmmError::Migration(m)),
            Err(VmmError::Migration(m)) => return Err(VmmError::StateRejected(m)),
            // QEMU exits when it cannot load the state.
            Err(VmmError::Qmp(e)) => return Err(VmmError::StateRejected(e.to_string())),
            Err(e) => return Err(e),
        }
        // QEMU starts the guest when the incoming migration completes; make
        // sure of it in case autostart was off.
        let status = self.command(&QueryStatus).await?;
        if !status.running {
            self.resume().await?;
        }
        Ok(())
    }

    /// Freeze the disk's active layer `node`: writes go on in a new qcow2
    /// overlay `new_file` (node `new_node`) backed by it.
    pub async fn freeze_disk(
        &self,
        node: &str,
        new_file: &Path,
        new_node: &str,
    ) -> Result<(), VmmError> {
        self.command(&BlockdevSnapshotSync {
            node_name: node.to_string(),
            snapshot_file: new_file.display().to_string(),
            snapshot_node_name: new_node.to_string(),
            format: "qcow2".into(),
        })
        .await?;
        Ok(())
    }

    /// Flatten the disk chain under the active layer `node` onto `base` (the
    /// image's base disk) while the guest runs, and wait until it is done.
    /// On failure or timeout the job is cancelled: the chain stays as it was
    /// (data already copied into the top layer is the same data).
    pub async fn stream_disk(
        &self,
        node: &str,
        base: &Path,
        timeout: Duration,
    ) -> Result<(), VmmError> {
        let job_id = format!("stream-{node}");
        let mut events = self.qmp().events();
        self.command(&BlockStream {
            job_id: job_id.clone(),
            device: node.to_string(),
            base: base.display().to_string(),
        })
        .await?;
        let done = async {
            loop {
                let ev = match events.recv().await {
                    Ok(ev) => ev,
                    // Missed events: the job's own end may be among them.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if self.block_job_running(&job_id).await? {
                            continue;
                        }
                        return Err(VmmError::Migration(
                            "disk streaming ended unobserved".into(),
                        ));
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(VmmError::Migration(
                            "QMP closed during disk streaming".into(),
                        ));
                    }
                };
                let ours = ev.data["device"] == job_id.as_str();
                match ev.event.as_str() {
                    "BLOCK_JOB_COMPLETED" if ours => {
                        return match ev.data["error"].as_str() {
                            Some(e) => Err(VmmError::Migration(format!("disk streaming: {e}"))),
                            None => Ok(()),
                        };
                    }
                    "BLOCK_JOB_CANCELLED" if ours => {
                        return Err(VmmError::Migration("disk streaming cancelled".into()));
                    }
                    _ => {}
                }
            }
        };
        let result = match tokio::time::timeout(timeout, done).await {
            Ok(r) => r,
            Err(_) => Err(VmmError::Migration("disk streaming timed out".into())),
        };
        if result.is_err() {
            let _ = self
                .command(&BlockJobCancel {
                    device: job_id.clone(),
                })
                .await;
        }
        result
    }

    /// Wait until QEMU has seen the agent connection go (its chardev shows
    /// `disconnected:`): the control message that tells the guest is then
    /// in guest memory, before anything saves the device state that goes
    /// with that memory.
    pub async fn await_agent_disconnected(&self, timeout: Duration) -> Result<(), VmmError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let chardevs = self.command(&QueryChardev).await?;
            if chardevs
                .iter()
                .any(|c| c.label == AGENT_CHARDEV && c.filename.starts_with("disconnected:"))
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(VmmError::Agent(format!(
                    "QEMU did not see the agent connection close within {} ms",
                    timeout.as_millis()
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The files of the disk chain QEMU has open, active layer first, down
    /// to the base disk: what the guest's disk really is.
    pub async fn disk_chain(&self) -> Result<Vec<std::path::PathBuf>, VmmError> {
        let blocks = self.command(&QueryBlock).await?;
        let mut chain = Vec::new();
        let mut image = blocks.into_iter().find_map(|b| b.inserted).map(|i| i.image);
        while let Some(i) = image {
            chain.push(std::path::PathBuf::from(i.filename));
            image = i.backing_image.map(|b| *b);
        }
        Ok(chain)
    }

    async fn block_job_running(&self, job_id: &str) -> Result<bool, VmmError> {
        let jobs = self.command(&QueryBlockJobs).await?;
        Ok(jobs.iter().any(|j| j.device == job_id))
    }

    async fn wait_migration(&self) -> Result<(), VmmError> {
        let deadline = tokio::time::Instant::now() + MIGRATION_TIMEOUT;
        let mut events = self.qmp().events();
        loop {
            let info = self.command(&QueryMigrate).await?;
            match info.status.as_deref() {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    return Err(VmmError::Migration(
                        info.error_desc.unwrap_or_else(|| "migration failed".into()),
                    ));
                }
                _ => {}
            }
            // Wake on the next MIGRATION event (or re-check after a short
            // while: an event may have come before we subscribed).
            let wait = async {
                while let Ok(ev) = events.recv().await {
                    if ev.event == "MIGRATION" {
                        return;
                    }
                }
            };
            if tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(20)),
                wait,
            )
            .await
            .is_err()
                && tokio::time::Instant::now() >= deadline
            {
                return Err(VmmError::Migration(TIMED_OUT.into()));
            }
        }
    }
}

/// Quote a path for the shell that QEMU's `exec:` migration runs.
fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_paths_for_the_shell() {
        assert_eq!(shell_quote(Path::new("/a b/c")), "'/a b/c'");
        assert_eq!(shell_quote(Path::new("/it's")), r"'/it'\''s'");
    }
}
