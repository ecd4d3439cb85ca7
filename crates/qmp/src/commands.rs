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
