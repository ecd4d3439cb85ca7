//! Durable state: VMs, snapshots, routes, events, API keys and the queue of
//! S3 objects to delete.
//!
//! One interface, [`StateStore`], with two backends:
//! - [`SqliteStore`] (`<data-dir>/hatch.db`): one host, the default;
//! - [`PgStore`] (`--database-url postgres://...`): shared by the nodes of a
//!   cluster.
//!
//! Both run the same test suite ([`conformance`]): the SQLite one in this
//! crate's unit tests, the PostgreSQL one against a real server in the
//! end-to-end tests. Callers never see which backend they talk to.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use hatch_vmm::PortForward;

use crate::model::{
    Retention, Route, Snapshot, SnapshotKind, SnapshotStatus, Vm, VmEvent, VmState,
};

pub mod conformance;
mod postgres;
mod sqlite;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database error")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("database unreachable")]
    Unreachable(#[from] deadpool_postgres::PoolError),
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// Another node owns the VM now (it was taken over): nothing written.
    #[error("vm '{0}' belongs to another node now")]
    NotOwner(String),
}

impl StoreError {
    /// The database could not be reached (connection refused, lost, pool
    /// timed out): the call did nothing and may be repeated later.
    pub fn is_unreachable(&self) -> bool {
        match self {
            StoreError::Unreachable(_) => true,
            StoreError::Postgres(e) => {
                e.is_closed()
                    || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
            }
            StoreError::Sqlite(_) | StoreError::Corrupt(_) | StoreError::NotOwner(_) => false,
        }
    }
}

/// States in which a VM has a process on its node (counted per node).
const PROCESS_STATES: &str = "'starting', 'running', 'snapshotting', 'restoring', 'stopping'";

/// Events kept per VM.
pub const EVENTS_KEPT: i64 = 100;

/// A VM row: the API record plus what the runtime needs after a restart.
#[derive(Debug, Clone)]
pub struct VmRecord {
    pub vm: Vm,
    pub forwards: Vec<PortForward>,
    /// Fencing generation: raised by every change of owner or takeover, and
    /// compared by each (compare-and-set), so a stale actor changes nothing.
    pub epoch: i64,
}

/// An API key row (the key itself is never stored).
#[derive(Debug, Clone)]
pub struct ApiKeyRecord {
    pub id: String,
    pub hash: Vec<u8>,
    pub name: Option<String>,
    pub source: String,
    pub created_at: String,
}

/// A snapshot row: the API record plus what only the daemon needs.
#[derive(Debug, Clone)]
pub struct SnapshotRecord {
    pub snap: Snapshot,
    /// The local copy is complete (restorable without S3).
    pub local: bool,
    /// Disk layer files (in the VM's directory), oldest first.
    pub layers: Vec<String>,
    /// When the local copy was last captured or restored from.
    pub local_used_at: Option<String>,
    /// Failed upload attempts so far.
    pub upload_attempts: u32,
}

/// A change of a VM's owner, as a compare-and-set on what was read.
#[derive(Debug, Clone)]
pub struct Claim<'a> {
    pub id: &'a str,
    /// The epoch read with the record.
    pub seen: i64,
    /// The owner read with the record (None: no owner recorded).
    pub from: Option<&'a str>,
    pub to: &'a str,
    /// Only if `from` has not heartbeat for longer than this (by the
    /// store's clock): the check and the change are one statement, so an
    /// owner that comes back in between keeps its VM.
    pub from_silent_for: Option<std::time::Duration>,
}

/// What a node writes with each heartbeat.
#[derive(Debug, Clone)]
pub struct NodeBeat {
    pub name: String,
    /// `--cluster-addr`, if any.
    pub addr: Option<String>,
    pub free_memory_mib: u64,
    /// When this daemon started (RFC 3339).
    pub started_at: String,
}

/// A `nodes` row with what the store computes on reading it.
#[derive(Debug, Clone)]
pub struct NodeRecord {
    pub name: String,
    pub addr: Option<String>,
    /// What the node asked to be: `up` or `draining` (`down` is computed
    /// from the heartbeat's age by the reader).
    pub state: String,
    pub started_at: String,
    pub free_memory_mib: u64,
    /// The last heartbeat, RFC 3339 (the store's clock).
    pub heartbeat_at: String,
    /// Age of the last heartbeat by the store's clock (in a cluster, the
    /// database's: node clocks are never compared).
    pub silent_for: std::time::Duration,
    /// VMs whose process runs on the node.
    pub vms: u64,
}

/// An imported image as the cluster knows it. Its files are the image
/// manifest's in S3, or only on `node` when it was imported without
/// snapshot storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    pub name: String,
    /// Which import (`img-…`): a node's copy with another id is stale.
    pub id: String,
    pub created_at: String,
    /// The node that imported it.
    pub node: String,
    /// Key of its manifest in S3; None: imported without snapshot storage.
    pub manifest: Option<String>,
    /// What `GET /images` shows of it besides the above (JSON).
    pub details: String,
}

/// What [`StateStore::delete_image`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageDeletion {
    Deleted,
    NotFound,
    /// These VMs use it: nothing changed.
    InUse(Vec<String>),
}

/// Where Hatch keeps its state. Every method is one atomic change or one
/// consistent read; none holds a lock across calls.
#[async_trait]
pub trait StateStore: Send + Sync {
    /// Which backend this is, for logs (`sqlite` or `postgres`).
    fn backend(&self) -> &'static str;

    // --- VMs ---
    async fn insert_vm(&self, vm: &Vm) -> Result<(), StoreError>;
    async fn vm_name_taken(&self, name: &str) -> Result<bool, StoreError>;
    async fn vm_id_by_name(&self, name: &str) -> Result<Option<String>, StoreError>;
    async fn get_vm(&self, id: &str) -> Result<Option<VmRecord>, StoreError>;
    /// Every VM, oldest first.
    async fn list_vms(&self) -> Result<Vec<VmRecord>, StoreError>;
    /// Record a VM's state, as node `owner`: Ok(false) (and nothing
    /// changed) if another node owns the VM now (it was taken over).
    async fn set_vm_state(
        &self,
        id: &str,
        state: VmState,
        reason: Option<&str>,
        owner: &str,
    ) -> Result<bool, StoreError>;
    /// Make `claim.to` the VM's owner if nothing changed since it was read
    /// (raising the epoch); Ok(false): someone else changed it first, or the
    /// owner is not silent as required.
    async fn claim_vm(&self, claim: &Claim<'_>) -> Result<bool, StoreError>;
    /// A claim that also sets the state of a VM whose node was lost.
    async fn take_over_vm(
        &self,
        claim: &Claim<'_>,
        state: VmState,
        reason: &str,
    ) -> Result<bool, StoreError>;
    /// Record a (re)start: `started_at` set, the boot time cleared.
    async fn set_vm_started(&self, id: &str, started_at: &str) -> Result<(), StoreError>;
    /// As node `owner` (NotOwner if another node owns the VM now).
    async fn set_vm_forwards(
        &self,
        id: &str,
        forwards: &[PortForward],
        owner: &str,
    ) -> Result<(), StoreError>;
    async fn set_vm_boot_ms(&self, id: &str, boot_ms: u64) -> Result<(), StoreError>;
    /// Record the node that runs (or ran last) a VM.
    async fn set_vm_node(&self, id: &str, node: &str) -> Result<(), StoreError>;
    /// Delete a VM with its routes, snapshots and events in one transaction,
    /// queueing the deletion of `objects` (its manifests in S3) in the same
    /// transaction: a crash right after cannot leave them behind forever.
    /// Answers the host names of the routes deleted with it.
    async fn delete_vm(
        &self,
        id: &str,
        objects: &[String],
        now: &str,
    ) -> Result<Vec<String>, StoreError>;

    // --- disk layers and snapshots ---
    /// A VM's disk layer files, oldest first.
    async fn disk_layers(&self, vm_id: &str) -> Result<Vec<String>, StoreError>;
    /// As node `owner` (NotOwner if another node owns the VM now).
    async fn set_disk_layers(
        &self,
        vm_id: &str,
        layers: &[String],
        owner: &str,
    ) -> Result<(), StoreError>;
    /// Insert a snapshot, or write back every mutable field of an existing one.
    async fn save_snapshot(&self, s: &SnapshotRecord) -> Result<(), StoreError>;
    /// A VM's snapshots, newest first.
    async fn list_snapshots(&self, vm_id: &str) -> Result<Vec<SnapshotRecord>, StoreError>;
    async fn get_snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>, StoreError>;
    /// Delete a snapshot record, queueing the deletion of `object` (its
    /// manifest) in the same transaction.
    async fn delete_snapshot(&self, id: &str, object: &str, now: &str) -> Result<(), StoreError>;
    /// Snapshots of every VM with `status`, oldest first.
    async fn snapshots_with_status(
        &self,
        status: SnapshotStatus,
    ) -> Result<Vec<SnapshotRecord>, StoreError>;
    /// Every snapshot with a local copy, least recently used first.
    async fn local_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError>;
    async fn retention(&self, vm_id: &str) -> Result<Retention, StoreError>;
    async fn set_retention(&self, vm_id: &str, r: &Retention) -> Result<(), StoreError>;

    // --- events ---
    /// Append an event to a VM's history (the newest [`EVENTS_KEPT`] are kept).
    async fn add_event(&self, e: &VmEvent) -> Result<(), StoreError>;
    /// A VM's events, newest first.
    async fn list_events(&self, vm_id: &str) -> Result<Vec<VmEvent>, StoreError>;

    // --- routes ---
    async fn insert_route(&self, route: &Route) -> Result<(), StoreError>;
    /// Every route, oldest first.
    async fn list_routes(&self) -> Result<Vec<Route>, StoreError>;
    /// Ok(false): there was no such route.
    async fn delete_route(&self, id: &str) -> Result<bool, StoreError>;

    // --- API keys ---
    /// Every key, oldest first.
    async fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError>;
    /// Add a key; an existing key with the same hash is left as it is.
    async fn insert_api_key(&self, k: &ApiKeyRecord) -> Result<(), StoreError>;
    /// Delete key `id` unless it is the last one, in one transaction (two
    /// revocations at once cannot leave no key). Ok(false): it is the last.
    async fn delete_api_key_unless_last(&self, id: &str) -> Result<bool, StoreError>;
    /// Revoke every key that came from `HATCH_API_KEY` but `keep` (the
    /// hash of the one set now, if any). Answers how many went.
    async fn revoke_env_keys_except(&self, keep: Option<&[u8]>) -> Result<usize, StoreError>;

    // --- nodes ---
    /// Register a node or renew its heartbeat (stamped with the store's
    /// clock). A node's `draining` mark survives its heartbeats.
    async fn heartbeat(&self, beat: &NodeBeat) -> Result<(), StoreError>;
    /// Every node that ever joined, by name.
    async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    /// Mark a node `up` or `draining`; Ok(false): no such node.
    async fn set_node_state(&self, name: &str, state: &str) -> Result<bool, StoreError>;

    // --- imported images ---
    /// Record an imported image; Ok(false): the name is taken.
    async fn insert_image(&self, image: &ImageRecord) -> Result<bool, StoreError>;
    async fn get_image(&self, name: &str) -> Result<Option<ImageRecord>, StoreError>;
    /// Every imported image, by name.
    async fn list_images(&self) -> Result<Vec<ImageRecord>, StoreError>;
    /// Delete image `name` unless a VM (of any node) uses it, queueing its
    /// manifest's deletion from S3, in one transaction.
    async fn delete_image(&self, name: &str, now: &str) -> Result<ImageDeletion, StoreError>;

    // --- objects to delete from S3, retried ---
    /// Record a failed attempt to delete `key` (queueing it if need be).
    async fn add_pending_delete(&self, key: &str, error: &str, now: &str)
    -> Result<(), StoreError>;
    /// Queued deletions with their failed attempts, oldest first.
    async fn pending_deletes(&self) -> Result<Vec<(String, u32)>, StoreError>;
    async fn remove_pending_delete(&self, key: &str) -> Result<(), StoreError>;
}

/// Open the store: PostgreSQL when `database_url` is given, else SQLite at
/// `<data_dir>/hatch.db`. Either way the schema is migrated to this version.
pub async fn open(
    database_url: Option<&str>,
    data_dir: &Path,
) -> Result<Arc<dyn StateStore>, StoreError> {
    Ok(match database_url {
        Some(url) => Arc::new(PgStore::connect(url).await?),
        None => Arc::new(SqliteStore::open(&data_dir.join("hatch.db"))?),
    })
}

/// A JSON column that must parse (a bad one is reported, not guessed).
fn from_json<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("bad {what}: {e}")))
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// A `vms` row as both backends read it, before its text columns are parsed.
struct VmRow {
    id: String,
    name: String,
    state: String,
    state_reason: Option<String>,
    image: String,
    vcpus: u32,
    memory_mib: u64,
    disk_mib: u64,
    created_at: String,
    started_at: Option<String>,
    boot_ms: Option<u64>,
    forwards: String,
    node: Option<String>,
    epoch: i64,
    /// JSON of the VM's [`VmSettings`] (the column is named for its first
    /// content, the app's settings); NULL when none were given.
    app: Option<String>,
}

/// The columns of a VM row, in [`VmRow`]'s order.
const VM_COLUMNS: &str = "id, name, state, state_reason, image, vcpus, memory_mib, disk_mib,
    created_at, started_at, boot_ms, forwards, node, epoch, app";

/// The `app` column of a VM.
fn app_column(vm: &Vm) -> Result<Option<String>, StoreError> {
    if vm.settings.is_empty() {
        return Ok(None);
    }
    serde_json::to_string(&vm.settings)
        .map(Some)
        .map_err(|e| StoreError::Corrupt(format!("encoding the VM's app settings: {e}")))
}

impl VmRow {
    fn parse(self) -> Result<VmRecord, StoreError> {
        let state = VmState::parse(&self.state)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown VM state {:?}", self.state)))?;
        let forwards: Vec<PortForward> = from_json("forwards", &self.forwards)?;
        Ok(VmRecord {
            vm: Vm {
                id: self.id,
                name: self.name,
                state,
                state_reason: self.state_reason,
                image: self.image,
                vcpus: self.vcpus,
                memory_mib: self.memory_mib,
                disk_mib: self.disk_mib,
                created_at: self.created_at,
                started_at: self.started_at,
                boot_ms: self.boot_ms,
                ports: forwards.clone(),
                ready: false,
                idle_timeout_seconds: None,
                idle_timeout_route: None,
                node: self.node,
                settings: match &self.app {
                    Some(json) => from_json("app", json)?,
                    None => Default::default(),
                },
            },
            forwards,
            epoch: self.epoch,
        })
    }
}

/// A `snapshots` row before its text columns are parsed.
struct SnapshotRow {
    id: String,
    vm_id: String,
    status: String,
    trigger: String,
    created_at: String,
    memory_bytes: u64,
    disk_bytes: u64,
    stored_bytes: u64,
    pause_ms: Option<u64>,
    error: Option<String>,
    local: bool,
    layers: String,
    kind: String,
    local_used_at: Option<String>,
    upload_attempts: u32,
}

/// The columns of a snapshot row, in [`SnapshotRow`]'s order.
const SNAPSHOT_COLUMNS: &str = "id, vm_id, status, trigger, created_at, memory_bytes, disk_bytes,
    stored_bytes, pause_ms, error, local, layers, kind, local_used_at, upload_attempts";

impl SnapshotRow {
    fn parse(self) -> Result<SnapshotRecord, StoreError> {
        let status = SnapshotStatus::parse(&self.status).ok_or_else(|| {
            StoreError::Corrupt(format!("unknown snapshot status {:?}", self.status))
        })?;
        let kind = SnapshotKind::parse(&self.kind)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown snapshot kind {:?}", self.kind)))?;
        Ok(SnapshotRecord {
            snap: Snapshot {
                id: self.id,
                vm_id: self.vm_id,
                kind,
                status,
                trigger: self.trigger,
                created_at: self.created_at,
                memory_bytes: self.memory_bytes,
                disk_bytes: self.disk_bytes,
                stored_bytes: self.stored_bytes,
                pause_ms: self.pause_ms,
                error: self.error,
            },
            local: self.local,
            layers: from_json("layers", &self.layers)?,
            local_used_at: self.local_used_at,
            upload_attempts: self.upload_attempts,
        })
    }
}
