//! What becomes of a snapshot that a daemon restart found unfinished. A
//! pure decision; the daemon gathers the facts (files, the VM's state, the
//! local copy's seal) and carries it out.
//!
//! The rule it encodes: nothing that may be a VM's only state is thrown
//! away, and nothing older than the live VM is resumed as if it were newer.

use crate::{SnapshotKind, SnapshotStatus};

/// A snapshot's record and what is on this node's disk for it.
#[derive(Debug, Clone, Copy)]
pub struct Found {
    pub status: SnapshotStatus,
    pub kind: SnapshotKind,
    /// A local copy is recorded (uploads read from it).
    pub local: bool,
    /// A checkpoint's files were all written: its sealed local description
    /// verifies against them. Only looked at for a capturing checkpoint.
    pub checkpoint_verified: bool,
    /// The VM is failed without a QEMU (a suspend whose completion failed).
    pub vm_failed: bool,
    /// The suspend's device state was saved.
    pub state_saved: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterRestart {
    /// Nothing to do: finished, or an upload the storage worker resumes
    /// from the local copy, or a suspend kept for completion at start.
    Leave,
    /// A checkpoint completed before the restart: keep it, upload it from
    /// its local copy.
    KeepCheckpoint,
    /// Cut short before anything restorable existed: failed.
    Fail,
}

pub fn after_restart(f: Found) -> AfterRestart {
    match (f.status, f.kind) {
        (SnapshotStatus::Ready | SnapshotStatus::Failed, _) => AfterRestart::Leave,
        (SnapshotStatus::Uploading, _) if f.local => AfterRestart::Leave,
        (SnapshotStatus::Capturing, SnapshotKind::Checkpoint) if f.checkpoint_verified => {
            AfterRestart::KeepCheckpoint
        }
        // Its files may be the VM's only state (completing it is retried
        // at every start). If the VM runs, its guest went on and the
        // suspend is void.
        (SnapshotStatus::Capturing, SnapshotKind::Suspend) if f.vm_failed && f.state_saved => {
            AfterRestart::Leave
        }
        _ => AfterRestart::Fail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(status: SnapshotStatus, kind: SnapshotKind) -> Found {
        Found {
            status,
            kind,
            local: false,
            checkpoint_verified: false,
            vm_failed: false,
            state_saved: false,
        }
    }

    #[test]
    fn finished_snapshots_are_left_alone() {
        for status in [SnapshotStatus::Ready, SnapshotStatus::Failed] {
            for kind in [SnapshotKind::Suspend, SnapshotKind::Checkpoint] {
                assert_eq!(after_restart(found(status, kind)), AfterRestart::Leave);
            }
        }
    }

    #[test]
    fn uploads_resume_only_from_a_local_copy() {
        let mut f = found(SnapshotStatus::Uploading, SnapshotKind::Suspend);
        assert_eq!(after_restart(f), AfterRestart::Fail);
        f.local = true;
        assert_eq!(after_restart(f), AfterRestart::Leave);
    }

    #[test]
    fn a_checkpoint_is_kept_only_when_all_its_files_verify() {
        let mut f = found(SnapshotStatus::Capturing, SnapshotKind::Checkpoint);
        assert_eq!(after_restart(f), AfterRestart::Fail);
        f.checkpoint_verified = true;
        assert_eq!(after_restart(f), AfterRestart::KeepCheckpoint);
        // Even a failed VM is never "completed" from a checkpoint: its live
        // RAM and disk were newer than the checkpoint's state.
        let mut f = found(SnapshotStatus::Capturing, SnapshotKind::Checkpoint);
        f.vm_failed = true;
        f.state_saved = true;
        assert_eq!(after_restart(f), AfterRestart::Fail);
    }

    #[test]
    fn a_suspend_is_kept_for_completion_only_for_a_failed_vm_with_saved_state() {
        let mut f = found(SnapshotStatus::Capturing, SnapshotKind::Suspend);
        f.state_saved = true;
        assert_eq!(after_restart(f), AfterRestart::Fail, "the vm ran on");
        f.vm_failed = true;
        assert_eq!(after_restart(f), AfterRestart::Leave);
        f.state_saved = false;
        assert_eq!(after_restart(f), AfterRestart::Fail, "nothing was saved");
    }

    #[test]
    fn pending_snapshots_fail() {
        for kind in [SnapshotKind::Suspend, SnapshotKind::Checkpoint] {
            assert_eq!(
                after_restart(found(SnapshotStatus::Pending, kind)),
                AfterRestart::Fail
            );
        }
    }
}
