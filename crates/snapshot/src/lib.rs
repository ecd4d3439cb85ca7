//! Hatch's snapshot engine, the parts that need neither QEMU nor S3 nor the
//! database, so that they are tested alone:
//!
//! - [`manifest`]: the versioned, sealed description of a snapshot in S3,
//!   validated field by field before anything it names is fetched;
//! - [`image_manifest`]: an imported image as stored in S3, for the other
//!   nodes of a cluster;
//! - [`seal`]: keyed BLAKE3 MACs over what Hatch wrote (manifests, local
//!   copies), with key rotation;
//! - [`local_copy`]: the sealed description of a snapshot's copy on a node;
//! - [`durable`]: write, sync, rename: how every captured or fetched file
//!   reaches the disk;
//! - [`names`]: the exact forms of ids and layer names;
//! - [`retention`]: which snapshots a policy deletes;
//! - [`recovery`]: what becomes of a snapshot a daemon restart cut short.
//!
//! The capture and restore pipelines, which drive QEMU and the chunk store
//! (`hatch-chunks`) for a VM's supervisor, live in the daemon
//! (`hatch-server`'s `snapshot` module) and use these.

pub mod durable;
mod envelope;
pub mod image_manifest;
pub mod local_copy;
pub mod manifest;
pub mod names;
pub mod recovery;
pub mod retention;
pub mod seal;

use serde::{Deserialize, Serialize};

/// The smallest guest memory Hatch runs (and accepts from a manifest).
pub const MIN_MEMORY_MIB: u64 = 64;

/// Progress of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotStatus {
    Pending,
    Capturing,
    Uploading,
    Ready,
    Failed,
}

impl SnapshotStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotStatus::Pending => "pending",
            SnapshotStatus::Capturing => "capturing",
            SnapshotStatus::Uploading => "uploading",
            SnapshotStatus::Ready => "ready",
            SnapshotStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<SnapshotStatus> {
        [
            SnapshotStatus::Pending,
            SnapshotStatus::Capturing,
            SnapshotStatus::Uploading,
            SnapshotStatus::Ready,
            SnapshotStatus::Failed,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

/// What a snapshot captured: a suspend (the VM ended with it, its RAM file
/// became the snapshot's) or a checkpoint (the VM ran on; RAM was copied).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    Suspend,
    Checkpoint,
}

impl SnapshotKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::Suspend => "suspend",
            SnapshotKind::Checkpoint => "checkpoint",
        }
    }

    pub fn parse(s: &str) -> Option<SnapshotKind> {
        [SnapshotKind::Suspend, SnapshotKind::Checkpoint]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

#[cfg(test)]
mod tests {
    use super::{SnapshotKind, SnapshotStatus};

    #[test]
    fn kinds_and_statuses_round_trip_through_their_names() {
        for kind in [SnapshotKind::Suspend, SnapshotKind::Checkpoint] {
            assert_eq!(SnapshotKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(SnapshotKind::parse("Suspend"), None);
        for status in [
            SnapshotStatus::Pending,
            SnapshotStatus::Capturing,
            SnapshotStatus::Uploading,
            SnapshotStatus::Ready,
            SnapshotStatus::Failed,
        ] {
            assert_eq!(SnapshotStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(SnapshotStatus::parse("done"), None);
    }
}
