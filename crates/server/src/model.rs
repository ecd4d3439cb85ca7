//! The records the API speaks and the database keeps, their validation and
//! the VM lifecycle state machine.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The lifecycle of a VM. Every change goes through [`VmState::can_become`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Starting,
    Running,
    Snapshotting,
    Snapshotted,
    Restoring,
    Stopping,
    Stopped,
    Failed,
}

impl VmState {
    pub const ALL: [VmState; 8] = [
        VmState::Starting,
        VmState::Running,
        VmState::Snapshotting,
        VmState::Snapshotted,
        VmState::Restoring,
        VmState::Stopping,
        VmState::Stopped,
        VmState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Snapshotting => "snapshotting",
            VmState::Snapshotted => "snapshotted",
            VmState::Restoring => "restoring",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<VmState> {
        VmState::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Whether a QEMU process is expected to exist in this state.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            VmState::Starting
                | VmState::Running
                | VmState::Snapshotting
                | VmState::Stopping
                | VmState::Restoring
        )
    }

    /// The legal moves of the lifecycle. Anything may fail.
    pub fn can_become(self, to: VmState) -> bool {
        use VmState::*;
        if to == Failed {
            return true;
        }
        matches!(
            (self, to),
            (Stopped | Failed, Starting | Restoring)
                | (Starting, Running | Stopped)
                | (Running, Stopping | Snapshotting | Stopped | Restoring)
                | (Snapshotting, Running | Snapshotted)
                | (Snapshotted, Restoring | Starting)
                // Stopping a suspended VM discards its memory state.
                | (Snapshotted, Stopped)
                // A suspend completed at start after it had failed.
                | (Failed, Snapshotted)
                // A failed restore leaves the VM as restorable as before.
                | (Restoring, Running | Snapshotted | Stopped)
                | (Stopping, Stopped)
        )
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A VM as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    /// "vm-" followed by 12 random characters.
    pub id: String,
    pub name: String,
    pub state: VmState,
    /// Why the VM is in its state, when that is not obvious (failures, exits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<String>,
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// Milliseconds from QEMU launch until the guest first answered HTTP on
    /// port 8080 (measured for the last cold boot).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_ms: Option<u64>,
    /// Guest ports reachable on the host's loopback while the VM runs
    /// (`{"host": 41234, "guest": 8080}`), for direct access and debugging.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<Object>)]
    pub ports: Vec<hatch_vmm::PortForward>,
    /// Running and its app answers (after a cold boot: once the boot probe
    /// got an HTTP answer on a forwarded port). Proxied requests wait for it.
    #[serde(default)]
    pub ready: bool,
    /// The idle timeout that applies to this VM: the longest of its routes'
    /// (a VM is idle only when all its routes are).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_seconds: Option<u64>,
    /// The host name of the route that sets `idle_timeout_seconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_route: Option<String>,
    /// The node that runs this VM, or ran it last (`--node-name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Settings given at creation: an imported image's app (`env`, `cmd`,
    /// `restart`) and the VM's outbound network (`network`).
    #[serde(flatten)]
    pub settings: VmSettings,
}

/// Per-VM settings given at creation (`POST /vms`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmSettings {
    /// Added to the image's environment (and to exec'd commands').
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Replaces the image's Cmd (its Entrypoint stays), as `docker run
    /// IMAGE ARGS...` does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// What happens when the app exits [default: the VM stops, with
    /// `state_reason` saying how the app ended].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartPolicy>,
    /// The VM's outbound network; none for VMs made before it existed
    /// (they have the inbound, proxy-only network alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkSettings>,
}

/// How a VM reaches out (docs/NETWORK.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NetworkSettings {
    /// `tap`: a network card of its own with NAT out of the host (egress
    /// per `egress`); `user`: QEMU user-mode networking, inbound through
    /// the proxy only and no egress (where tap cannot be used).
    pub mode: NetworkMode,
    /// "allow", "deny" or a list of IPv4 CIDRs.
    #[schema(value_type = Object)]
    pub egress: Egress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    Tap,
    User,
}

/// Where a VM may connect to: `"allow"` (anywhere outside the host and
/// other VMs), `"deny"`, or a list of IPv4 CIDRs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "EgressRepr", into = "EgressRepr")]
pub enum Egress {
    Allow,
    Deny,
    Only(Vec<ipnet::Ipv4Net>),
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum EgressRepr {
    Word(String),
    List(Vec<ipnet::Ipv4Net>),
}

impl TryFrom<EgressRepr> for Egress {
    type Error = String;
    fn try_from(r: EgressRepr) -> Result<Egress, String> {
        match r {
            EgressRepr::Word(w) if w == "allow" => Ok(Egress::Allow),
            EgressRepr::Word(w) if w == "deny" => Ok(Egress::Deny),
            EgressRepr::Word(w) => Err(format!(
                "egress is \"allow\", \"deny\" or a list of IPv4 CIDRs, not {w:?}"
            )),
            EgressRepr::List(nets) if nets.len() > 256 => {
                Err("egress lists at most 256 CIDRs".into())
            }
            EgressRepr::List(nets) => Ok(Egress::Only(nets)),
        }
    }
}

impl From<Egress> for EgressRepr {
    fn from(e: Egress) -> EgressRepr {
        match e {
            Egress::Allow => EgressRepr::Word("allow".into()),
            Egress::Deny => EgressRepr::Word("deny".into()),
            Egress::Only(nets) => EgressRepr::List(nets),
        }
    }
}

/// Longest `hatch.app=` kernel parameter: the kernel's command line holds
/// 2048 bytes in all, and Hatch's own parameters need some.
pub const MAX_APP_PARAM: usize = 1400;

impl VmSettings {
    pub fn is_empty(&self) -> bool {
        self == &VmSettings::default()
    }

    /// Whether app settings (for imported images only) are given.
    pub fn has_app_settings(&self) -> bool {
        !self.env.is_empty() || self.cmd.is_some() || self.restart.is_some()
    }

    /// The kernel parameter that hands the app settings to the guest
    /// (`hatch.app=<base64url of JSON>`); None when there are none.
    pub fn kernel_param(&self) -> Option<String> {
        use base64::Engine;
        if !self.has_app_settings() {
            return None;
        }
        let app = serde_json::json!({"env": self.env, "cmd": self.cmd, "restart": self.restart});
        let json = serde_json::to_vec(&app).ok()?;
        Some(format!(
            "hatch.app={}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
        ))
    }

    /// Checks for `POST /vms`.
    pub fn validate(&self) -> Result<(), Invalid> {
        validate_env(&self.env)?;
        if let Some(cmd) = &self.cmd
            && cmd.iter().any(|a| a.contains('\0'))
        {
            return Err(Invalid("cmd holds a NUL byte".into()));
        }
        if let Some(RestartPolicy {
            max_retries: Some(n),
            ..
        }) = &self.restart
            && *n > 10_000
        {
            return Err(Invalid("restart.max_retries is at most 10000".into()));
        }
        if self.kernel_param().is_some_and(|p| p.len() > MAX_APP_PARAM) {
            return Err(Invalid(format!(
                "env, cmd and restart together are too large: they travel on the kernel command line, which leaves about {} bytes of JSON for them; put larger configuration in the image, or copy it in with `hatch vm cp`",
                MAX_APP_PARAM * 3 / 4 - 20
            )));
        }
        Ok(())
    }
}

/// Restart policy of an app, as Fly Machines have it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestartPolicy {
    pub policy: RestartMode,
    /// With `on-failure`: restarts at most this many times in a row
    /// [default: 10].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartMode {
    /// The VM stops when the app exits.
    No,
    /// The app is restarted when it exits with a non-zero status.
    OnFailure,
    /// The app is restarted whenever it exits.
    Always,
}

impl Vm {
    /// A new VM's record in `state`, nothing measured yet; the default size
    /// (callers set theirs with struct update syntax).
    pub fn fresh(
        id: String,
        name: String,
        state: VmState,
        image: String,
        created_at: String,
    ) -> Vm {
        Vm {
            id,
            name,
            state,
            state_reason: None,
            image,
            vcpus: DEFAULT_VCPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            disk_mib: 0,
            created_at,
            started_at: None,
            boot_ms: None,
            ports: Vec::new(),
            ready: false,
            idle_timeout_seconds: None,
            idle_timeout_route: None,
            node: None,
            settings: VmSettings::default(),
        }
    }
}

/// Body of `POST /vms`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// Unique; lowercase letters, digits and '-', at most 63, not starting
    /// with "vm-". Defaults to the id.
    #[schema(
        pattern = r"^(?!vm-)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
        max_length = 63
    )]
    pub name: Option<String>,
    /// A registered image name; "default" if absent.
    pub image: Option<String>,
    /// 1 up to the host's CPU count; default 1.
    #[schema(minimum = 1)]
    pub vcpus: Option<u32>,
    /// 64 up to the host's memory less 1 GiB; default 256.
    #[schema(minimum = 64)]
    pub memory_mib: Option<u64>,
    /// At least the image's disk size (the default), at most 1 TiB.
    #[schema(minimum = 1, maximum = 1048576)]
    pub disk_mib: Option<u64>,
    /// Fork: start the new VM from this ready snapshot (of any VM), with
    /// its memory, disk and devices as captured; image, vcpus, memory and
    /// disk are the snapshot's and cannot be given.
    #[schema(pattern = r"^snap-[a-z0-9]{12}$")]
    pub from_snapshot: Option<String>,
    /// An imported image's app: environment variables added to the image's.
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    /// An imported image's app: replaces the image's Cmd.
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// An imported image's app: restart it when it exits
    /// (`{"policy": "no"|"on-failure"|"always", "max_retries"?}`).
    #[serde(default)]
    pub restart: Option<RestartPolicy>,
    /// Outbound network: "allow" (default), "deny", or a list of IPv4
    /// CIDRs the VM may connect to.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub egress: Option<Egress>,
}

/// A proxy route: requests whose Host is `hostname` go to `port` of `vm_id`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Route {
    /// "rt-" followed by 12 random characters.
    pub id: String,
    pub hostname: String,
    pub vm_id: String,
    pub port: u16,
    pub auto_wake: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout_seconds: Option<u64>,
    /// Path prefixes (health checks) whose requests neither wake the VM nor
    /// keep it awake.
    #[serde(default)]
    pub idle_ignore_paths: Vec<String>,
    pub created_at: String,
    /// The VM's state, filled in listings and lookups.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_state: Option<VmState>,
}

impl Route {
    /// Whether a request for `path` counts as activity (and may wake the VM).
    pub fn tracks(&self, path: &str) -> bool {
        !self
            .idle_ignore_paths
            .iter()
            .any(|p| path.starts_with(p.as_str()))
    }
}

/// Something that happened to a VM: a wake or an idle suspend.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct VmEvent {
    #[serde(skip)]
    pub vm_id: String,
    pub at: String,
    /// `wake` or `idle_suspend`.
    pub kind: String,
    /// What caused it: `request` (a proxied request woke the VM), `api`
    /// (POST /vms/{id}/restore) or `idle`.
    pub trigger: String,
    /// Wake: from the first held request (or the API call) until the VM ran.
    /// Idle suspend: the guest's pause.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// Set when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What went less well than it should, though it worked: a local copy
    /// that could not be used, a clock sync that needed retries, a slow
    /// fetch from S3.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Answer of `GET /vms/{id}/events`.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventList {
    pub events: Vec<VmEvent>,
}

/// Body of `POST /routes`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRoute {
    /// A DNS name (no port, no scheme); matched case-insensitively.
    #[schema(
        pattern = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$",
        max_length = 253
    )]
    pub hostname: String,
    /// The VM's id or name.
    pub vm_id: String,
    /// Guest TCP port; default 8080.
    #[schema(minimum = 1, maximum = 65535)]
    pub port: Option<u16>,
    /// Default true: requests wake a suspended VM and start a stopped one.
    pub auto_wake: Option<bool>,
    /// Suspend the VM after this many seconds without requests (1 to 30 days).
    #[schema(minimum = 1, maximum = 2592000)]
    pub idle_timeout_seconds: Option<u64>,
    /// Path prefixes (e.g. "/healthz") that neither wake nor keep awake.
    #[schema(max_items = 16)]
    pub idle_ignore_paths: Option<Vec<String>>,
}

pub use hatch_snapshot::{SnapshotKind, SnapshotStatus};

/// A saved state of a VM: memory, CPU and devices, disk.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    /// "snap-" followed by 12 random characters.
    pub id: String,
    pub vm_id: String,
    /// `suspend` (`stop: true`) or `checkpoint`.
    pub kind: SnapshotKind,
    /// `uploading` lasts until S3 holds the snapshot; failed attempts are
    /// retried with backoff (`error` tells the last one). `failed` is final.
    pub status: SnapshotStatus,
    pub created_at: String,
    /// "manual" or "idle".
    pub trigger: String,
    /// Guest RAM size (logical bytes).
    pub memory_bytes: u64,
    /// Bytes of the disk layers this snapshot references (logical).
    pub disk_bytes: u64,
    /// Bytes this snapshot newly wrote to S3 (after dedup and compression).
    pub stored_bytes: u64,
    /// How long the guest was not running for the capture.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Body of `POST /vms/{id}/snapshot`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// true: suspend (the VM ends `snapshotted`, its memory freed);
    /// false (default): checkpoint (the VM runs on).
    pub stop: Option<bool>,
}

/// Snapshots a new VM keeps (`keep_last`); the newest restorable one is
/// always kept. VMs made before this default keep the policy they had (an
/// upgrade deletes nobody's snapshots).
pub const DEFAULT_KEEP_LAST: u32 = 5;

/// Body of `POST /vms/{id}/move`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    /// The node to move to (`GET /nodes`).
    pub to: String,
    /// Wake it on that node at once (default true); false leaves it
    /// suspended there, woken by its next request.
    pub start: Option<bool>,
}

/// Body of `POST /vms/{id}/restore`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// Default: the newest restorable snapshot.
    pub snapshot_id: Option<String>,
}

/// Body and answer of `PUT /vms/{id}/retention`: which snapshots to keep.
/// A snapshot goes when it is beyond the newest `keep_last` or older than
/// `max_age_seconds`, except the VM's newest restorable one, which stays.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Keep this many newest snapshots; null: no limit. New VMs: 5.
    #[schema(minimum = 1, maximum = 10000)]
    pub keep_last: Option<u32>,
    /// Delete snapshots older than this; null: no limit.
    #[schema(minimum = 1)]
    pub max_age_seconds: Option<u64>,
}

/// S3 use of one VM's snapshots (ready ones).
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct StorageUsage {
    pub snapshots: u64,
    /// Sum of the snapshots' memory and disk sizes.
    pub logical_bytes: u64,
    /// Bytes the snapshots wrote to S3 after dedup and compression.
    pub stored_bytes: u64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct VmStorage {
    pub vm_id: String,
    pub name: String,
    #[serde(flatten)]
    pub usage: StorageUsage,
}

/// Answer of `GET /storage`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Storage {
    pub total: StorageUsage,
    pub vms: Vec<VmStorage>,
    pub uploads: UploadStatus,
    pub local: LocalStorage,
    /// Manifests whose deletion from S3 failed and is being retried.
    pub pending_deletes: u64,
}

/// The storage worker's uploads.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct UploadStatus {
    /// Snapshots waiting for (or in) an upload.
    pub queued: u64,
    pub in_progress: u64,
    /// Failed attempts so far (each is retried with backoff).
    pub retries: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error_at: Option<String>,
}

/// Local copies of snapshots in the data dir.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct LocalStorage {
    /// Bytes on disk (allocated) of local snapshot copies.
    pub bytes: u64,
    pub budget_bytes: u64,
    pub snapshots: u64,
    /// Copies that S3 holds too, which may be evicted.
    pub evictable_bytes: u64,
    /// Copies evicted since the daemon started.
    pub evictions: u64,
}

/// An API key as listed (never the key itself).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ApiKey {
    /// "key-" followed by 12 random characters.
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `env` (HATCH_API_KEY), `generated` (first start), `api`, or
    /// `legacy` (made by a version that did not record it).
    pub source: String,
    pub created_at: String,
}

/// Answer of `POST /keys`: the key is shown this once.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CreatedApiKey {
    #[serde(flatten)]
    pub info: ApiKey,
    /// The key, to send as `Authorization: Bearer KEY`.
    pub key: String,
}

/// Body of `POST /keys`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    /// 1-63 of letters, digits, '.', '_' and '-'.
    #[schema(pattern = r"^[A-Za-z0-9._-]{1,63}$")]
    pub name: Option<String>,
}

pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_MEMORY_MIB: u64 = 256;
pub use hatch_snapshot::MIN_MEMORY_MIB;
pub const MAX_DISK_MIB: u64 = 1024 * 1024;
pub const DEFAULT_GUEST_PORT: u16 = 8080;

/// Input the model refuses (answered 422 by the API).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// Environment variables given to a VM's app or to a command: names of
/// letters, digits and '_' not starting with a digit, values without NUL.
pub fn validate_env(env: &std::collections::BTreeMap<String, String>) -> Result<(), Invalid> {
    for (k, v) in env {
        let name_ok = !k.is_empty()
            && k.len() <= 256
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !k.as_bytes()[0].is_ascii_digit();
        if !name_ok {
            return Err(Invalid(format!(
                "environment variable name {k:?} is not valid (letters, digits and '_', not starting with a digit)"
            )));
        }
        if v.contains('\0') {
            return Err(Invalid(format!(
                "environment variable {k} holds a NUL byte"
            )));
        }
    }
    Ok(())
}

/// VM names: a DNS label, so that they can appear in host names.
pub fn validate_vm_name(name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        // Ids start with "vm-"; names must not look like them, so that a
        // name or an id identifies one VM unambiguously.
        && !name.starts_with("vm-");
    if ok {
        Ok(())
    } else {
        Err(Invalid(format!(
            "invalid name {name:?}: use 1-63 lowercase letters, digits and '-', not starting or ending with '-' and not starting with 'vm-'"
        )))
    }
}

/// Host names of routes: lowercase DNS names, at most 253 characters.
pub fn normalize_hostname(hostname: &str) -> Result<String, Invalid> {
    let h = hostname.trim().trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !h.is_empty() && h.len() <= 253 && h.split('.').all(label_ok) {
        Ok(h)
    } else {
        Err(Invalid(format!(
            "invalid hostname {hostname:?}: expected a DNS name such as app.example.com (no port, no scheme)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        for ok in ["a", "web-1", "x".repeat(63).as_str()] {
            assert!(validate_vm_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Web",
            "a_b",
            "a.b",
            "vm-web",
            "x".repeat(64).as_str(),
        ] {
            assert!(validate_vm_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hostnames_are_normalized_and_checked() {
        assert_eq!(
            normalize_hostname("Demo.LocalHost.").unwrap(),
            "demo.localhost"
        );
        for bad in ["", "a..b", "a:8080", "http://a", "-a.b", "a b", "é.com"] {
            assert!(normalize_hostname(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lifecycle_rejects_illegal_moves() {
        use VmState::*;
        assert!(Stopped.can_become(Starting));
        assert!(Starting.can_become(Running));
        assert!(Running.can_become(Stopping));
        assert!(Stopping.can_become(Stopped));
        assert!(Running.can_become(Failed));
        assert!(!Stopped.can_become(Running));
        assert!(!Running.can_become(Starting));
        assert!(!Stopping.can_become(Running));
        for s in VmState::ALL {
            assert_eq!(VmState::parse(s.as_str()), Some(s));
        }
    }
}

/// A daemon of the cluster as `GET /nodes` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Node {
    /// `--node-name`.
    pub name: String,
    /// `--cluster-addr`: where other nodes reach it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// `up`, `down` (not heard from for longer than the down time) or
    /// `draining` (takes no new wakes).
    pub state: String,
    /// VMs it runs (starting, running, snapshotting, restoring, stopping).
    pub vms: u64,
    /// Memory the host had available at its last heartbeat.
    pub free_memory_mib: u64,
    /// Its last heartbeat (the database's clock).
    pub last_heartbeat: String,
    /// Seconds since its last heartbeat (the database's clock).
    pub seconds_since_heartbeat: f64,
    pub started_at: String,
}
