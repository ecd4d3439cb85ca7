//! Typed QMP commands. Each struct serializes to the command's `arguments`.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A QMP command: its wire name and the type of its `return` value.
pub trait Command: Serialize {
    const NAME: &'static str;
    type Response: DeserializeOwned;
}

/// Commands whose `return` is an empty object.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub struct Empty {}

macro_rules! unit_command {
    ($(#[$doc:meta])* $ty:ident, $name:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default, Serialize)]
        pub struct $ty;
        impl Command for $ty {
            const NAME: &'static str = $name;
            type Response = Empty;
        }
    };
}

unit_command!(
    /// Pause all vCPUs.
    Stop,
    "stop"
);
unit_command!(
    /// Resume all vCPUs.
    Cont,
    "cont"
);
unit_command!(
    /// Terminate QEMU at once (block devices are flushed).
    Quit,
    "quit"
);
unit_command!(
    /// Press the ACPI power button.
    SystemPowerdown,
    "system_powerdown"
);

/// Ask for the run state of the vCPUs.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryStatus;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct StatusInfo {
    pub running: bool,
    /// e.g. "running", "paused", "prelaunch", "shutdown", "inmigrate".
    pub status: String,
}

impl Command for QueryStatus {
    const NAME: &'static str = "query-status";
    type Response = StatusInfo;
}

/// QEMU's version.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryVersion;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct VersionTriple {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct VersionInfo {
    pub qemu: VersionTriple,
    pub package: String,
}

impl Command for QueryVersion {
    const NAME: &'static str = "query-version";
    type Response = VersionInfo;
}

/// Run an HMP (human monitor) command line; some features, such as
/// `hostfwd_add`, exist only there. The answer is HMP's text output, which is
/// empty on success for most commands.
#[derive(Debug, Clone, Serialize)]
pub struct HumanMonitorCommand {
    #[serde(rename = "command-line")]
    pub command_line: String,
}

impl Command for HumanMonitorCommand {
    const NAME: &'static str = "human-monitor-command";
    type Response = String;
}

/// One migration capability and whether it is on.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationCapability {
    pub capability: String,
    pub state: bool,
}

/// Turn migration capabilities on or off (e.g. `x-ignore-shared`).
#[derive(Debug, Clone, Serialize)]
pub struct MigrateSetCapabilities {
    pub capabilities: Vec<MigrationCapability>,
}

impl Command for MigrateSetCapabilities {
    const NAME: &'static str = "migrate-set-capabilities";
    type Response = Empty;
}

/// Migration tunables. QEMU's default bandwidth cap (128 MiB/s) throttles
/// even a paused VM's state, so snapshots raise it.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateSetParameters {
    #[serde(rename = "max-bandwidth")]
    pub max_bandwidth: u64,
}

impl Command for MigrateSetParameters {
    const NAME: &'static str = "migrate-set-parameters";
    type Response = Empty;
}

/// Start an outgoing migration to `uri` (e.g. `exec:cat > FILE`).
#[derive(Debug, Clone, Serialize)]
pub struct Migrate {
    pub uri: String,
}

impl Command for Migrate {
    const NAME: &'static str = "migrate";
    type Response = Empty;
}

/// Start the incoming side of a migration of a QEMU run with `-incoming defer`.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateIncoming {
    pub uri: String,
}

impl Command for MigrateIncoming {
    const NAME: &'static str = "migrate-incoming";
    type Response = Empty;
}

/// Copy the data of a disk's backing layers (above `base`) into the node
/// `device`, live, then drop those layers from its chain: a long qcow2
/// chain becomes one layer over `base`. Completion is the event
/// `BLOCK_JOB_COMPLETED` with this `job-id`.
#[derive(Debug, Clone, Serialize)]
pub struct BlockStream {
    #[serde(rename = "job-id")]
    pub job_id: String,
    pub device: String,
    /// File name of the image that stays the backing file.
    pub base: String,
}

impl Command for BlockStream {
    const NAME: &'static str = "block-stream";
    type Response = Empty;
}

/// Stop a block job (its partial work is kept where harmless, e.g. data a
/// stream already copied into the top layer).
#[derive(Debug, Clone, Serialize)]
pub struct BlockJobCancel {
    /// The job id.
    pub device: String,
}

impl Command for BlockJobCancel {
    const NAME: &'static str = "block-job-cancel";
    type Response = Empty;
}

/// The block jobs running now.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryBlockJobs;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct BlockJobInfo {
    /// The job id (QEMU calls it `device`).
    pub device: String,
}

impl Command for QueryBlockJobs {
    const NAME: &'static str = "query-block-jobs";
    type Response = Vec<BlockJobInfo>;
}

/// The character devices. A socket chardev's `filename` starts with
/// `disconnected:` while no client is connected.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryChardev;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ChardevInfo {
    pub label: String,
    pub filename: String,
}

impl Command for QueryChardev {
    const NAME: &'static str = "query-chardev";
    type Response = Vec<ChardevInfo>;
}

/// The block devices and their image chains.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryBlock;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct BlockInfo {
    pub device: String,
    #[serde(default)]
    pub inserted: Option<BlockDeviceInfo>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct BlockDeviceInfo {
    #[serde(rename = "node-name", default)]
    pub node_name: Option<String>,
    pub image: ImageInfo,
}

/// One image of a chain and, nested, its backing image.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ImageInfo {
    pub filename: String,
    #[serde(rename = "backing-image", default)]
    pub backing_image: Option<Box<ImageInfo>>,
}

impl Command for QueryBlock {
    const NAME: &'static str = "query-block";
    type Response = Vec<BlockInfo>;
}

/// The state of the current or last migration.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryMigrate;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct MigrationInfo {
    /// "setup", "active", "completed", "failed", ...; absent before any migration.
    pub status: Option<String>,
    #[serde(rename = "error-desc")]
    pub error_desc: Option<String>,
}

impl Command for QueryMigrate {
    const NAME: &'static str = "query-migrate";
    type Response = MigrationInfo;
}

/// Freeze the active disk layer: new writes go to a new qcow2 overlay whose
/// backing file is the old top.
#[derive(Debug, Clone, Serialize)]
pub struct BlockdevSnapshotSync {
    #[serde(rename = "node-name")]
    pub node_name: String,
    #[serde(rename = "snapshot-file")]
    pub snapshot_file: String,
    #[serde(rename = "snapshot-node-name")]
    pub snapshot_node_name: String,
    pub format: String,
}

impl Command for BlockdevSnapshotSync {
    const NAME: &'static str = "blockdev-snapshot-sync";
    type Response = Empty;
}
