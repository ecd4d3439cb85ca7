//! SQLite state: VMs, routes and API key hashes, under `<data-dir>/hatch.db`.
//!
//! One connection behind a std Mutex: every statement is short and none is
//! held across an await, so an async lock would only add overhead.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::model::{
    Retention, Route, Snapshot, SnapshotKind, SnapshotStatus, Vm, VmEvent, VmState,
};
use hatch_vmm::PortForward;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database error")]
    Sqlite(#[from] rusqlite::Error),
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

/// Schema migrations, applied in order; `PRAGMA user_version` records progress.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE vms (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    state_reason TEXT,
    image TEXT NOT NULL,
    vcpus INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    disk_mib INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    started_at TEXT,
    boot_ms INTEGER,
    forwards TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE routes (
    id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL UNIQUE,
    vm_id TEXT NOT NULL REFERENCES vms(id),
    port INTEGER NOT NULL,
    auto_wake INTEGER NOT NULL,
    idle_timeout_seconds INTEGER,
    created_at TEXT NOT NULL
);
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    hash BLOB NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
"#,
    r#"
ALTER TABLE vms ADD COLUMN disk_layers TEXT NOT NULL DEFAULT '["disk.qcow2"]';
CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL,
    status TEXT NOT NULL,
    trigger TEXT NOT NULL,
    created_at TEXT NOT NULL,
    memory_bytes INTEGER NOT NULL DEFAULT 0,
    disk_bytes INTEGER NOT NULL DEFAULT 0,
    stored_bytes INTEGER NOT NULL DEFAULT 0,
    pause_ms INTEGER,
    error TEXT,
    -- the local copy (state, memory, disk layers) is complete
    local INTEGER NOT NULL DEFAULT 0,
    -- disk layer files, oldest first
    layers TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX snapshots_by_vm ON snapshots (vm_id, created_at);
"#,
    r#"
ALTER TABLE vms ADD COLUMN keep_last INTEGER;
ALTER TABLE vms ADD COLUMN max_age_seconds INTEGER;
"#,
    r#"
-- path prefixes whose requests neither wake the VM nor keep it awake (JSON list)
ALTER TABLE routes ADD COLUMN idle_ignore_paths TEXT NOT NULL DEFAULT '[]';
CREATE TABLE vm_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_id TEXT NOT NULL,
    at TEXT NOT NULL,
    kind TEXT NOT NULL,
    trigger TEXT NOT NULL,
    duration_ms INTEGER,
    snapshot_id TEXT,
    error TEXT
);
CREATE INDEX vm_events_by_vm ON vm_events (vm_id, seq);
"#,
    r#"
-- suspend or checkpoint: recovery finishes only suspends (a checkpoint's
-- RAM and disk went on changing after its state was saved). Rows from
-- before this column are taken for checkpoints, the safe reading.
ALTER TABLE snapshots ADD COLUMN kind TEXT NOT NULL DEFAULT 'checkpoint';
-- when the local copy was last captured or restored from (LRU eviction)
ALTER TABLE snapshots ADD COLUMN local_used_at TEXT;
ALTER TABLE snapshots ADD COLUMN upload_attempts INTEGER NOT NULL DEFAULT 0;
-- objects (manifests) whose deletion failed, retried by the storage worker
CREATE TABLE pending_deletes (
    key TEXT PRIMARY KEY,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    added_at TEXT NOT NULL
);
-- API keys: a name, and where they came from: env (HATCH_API_KEY, valid
-- while it is set), generated (printed on first start), api (POST /keys),
-- legacy (made before sources were recorded).
ALTER TABLE api_keys ADD COLUMN name TEXT;
-- Keys from before this column are `legacy`: never revoked automatically.
ALTER TABLE api_keys ADD COLUMN source TEXT NOT NULL DEFAULT 'legacy';
"#,
    r#"
-- Degradations of an event that still succeeded (JSON list of strings).
ALTER TABLE vm_events ADD COLUMN warnings TEXT NOT NULL DEFAULT '[]';
"#,
];

pub struct Db {
    conn: Mutex<Connection>,
}

/// Events kept per VM.
const EVENTS_KEPT: i64 = 100;

/// A VM row: the API record plus what the runtime needs after a restart.
#[derive(Debug, Clone)]
pub struct VmRecord {
    pub vm: Vm,
    pub forwards: Vec<PortForward>,
}

impl Db {
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // With WAL, NORMAL stays consistent after a crash and avoids an fsync
        // per state change on the async workers.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let db = Db {
            conn: Mutex::new(conn),
        };
        db.migrate()?;
        Ok(db)
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic mid-statement leaves SQLite itself consistent.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn migrate(&self) -> Result<(), DbError> {
        let mut conn = self.conn();
        let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i + 1)?;
            tx.commit()?;
        }
        Ok(())
    }

    // --- VMs ---

    pub fn insert_vm(&self, vm: &Vm) -> Result<(), DbError> {
        self.conn().execute(
            "INSERT INTO vms (id, name, state, state_reason, image, vcpus, memory_mib, disk_mib, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                vm.id,
                vm.name,
                vm.state.as_str(),
                vm.state_reason,
                vm.image,
                vm.vcpus,
                vm.memory_mib,
                vm.disk_mib,
                vm.created_at
            ],
        )?;
        Ok(())
    }

    pub fn vm_name_taken(&self, name: &str) -> Result<bool, DbError> {
        Ok(self
            .conn()
            .query_row("SELECT 1 FROM vms WHERE name = ?1", [name], |_| Ok(()))
            .optional()?
            .is_some())
    }

    pub fn vm_id_by_name(&self, name: &str) -> Result<Option<String>, DbError> {
        Ok(self
            .conn()
            .query_row("SELECT id FROM vms WHERE name = ?1", [name], |r| r.get(0))
            .optional()?)
    }

    pub fn get_vm(&self, id: &str) -> Result<Option<VmRecord>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!("{VM_SELECT} WHERE id = ?1"))?;
        let rec = stmt.query_row([id], vm_from_row).optional()?;
        rec.transpose()
    }

    pub fn list_vms(&self) -> Result<Vec<VmRecord>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!("{VM_SELECT} ORDER BY created_at, id"))?;
        let rows = stmt.query_map([], vm_from_row)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r??);
        }
        Ok(out)
    }

    pub fn set_vm_state(
        &self,
        id: &str,
        state: VmState,
        reason: Option<&str>,
    ) -> Result<(), DbError> {
        self.conn().execute(
            "UPDATE vms SET state = ?2, state_reason = ?3 WHERE id = ?1",
            params![id, state.as_str(), reason],
        )?;
        Ok(())
    }

    pub fn set_vm_started(&self, id: &str, started_at: &str) -> Result<(), DbError> {
        self.conn().execute(
            "UPDATE vms SET started_at = ?2, boot_ms = NULL WHERE id = ?1",
            params![id, started_at],
        )?;
        Ok(())
    }

    pub fn set_vm_forwards(&self, id: &str, forwards: &[PortForward]) -> Result<(), DbError> {
        let forwards =
            serde_json::to_string(forwards).map_err(|e| DbError::Corrupt(e.to_string()))?;
        self.conn().execute(
            "UPDATE vms SET forwards = ?2 WHERE id = ?1",
            params![id, forwards],
        )?;
        Ok(())
    }

    pub fn set_vm_boot_ms(&self, id: &str, boot_ms: u64) -> Result<(), DbError> {
        self.conn().execute(
            "UPDATE vms SET boot_ms = ?2 WHERE id = ?1",
            params![id, boot_ms],
        )?;
        Ok(())
    }

    /// Delete a VM and its routes in one transaction, queueing the deletion
    /// of `objects` (its manifests in S3) in the same transaction: a crash
    /// right after cannot leave them behind forever.
    pub fn delete_vm(
        &self,
        id: &str,
        objects: &[String],
        now: &str,
    ) -> Result<Vec<String>, DbError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for key in objects {
            queue_delete(&tx, key, now)?;
        }
        let hostnames = {
            let mut stmt = tx.prepare("SELECT hostname FROM routes WHERE vm_id = ?1")?;
            let rows = stmt.query_map([id], |r| r.get::<_, String>(0))?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        tx.execute("DELETE FROM routes WHERE vm_id = ?1", [id])?;
        tx.execute("DELETE FROM snapshots WHERE vm_id = ?1", [id])?;
        tx.execute("DELETE FROM vm_events WHERE vm_id = ?1", [id])?;
        tx.execute("DELETE FROM vms WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(hostnames)
    }

    // --- disk layers and snapshots ---

    pub fn disk_layers(&self, vm_id: &str) -> Result<Vec<String>, DbError> {
        let text: String =
            self.conn()
                .query_row("SELECT disk_layers FROM vms WHERE id = ?1", [vm_id], |r| {
                    r.get(0)
                })?;
        serde_json::from_str(&text).map_err(|e| DbError::Corrupt(format!("disk layers: {e}")))
    }

    pub fn set_disk_layers(&self, vm_id: &str, layers: &[String]) -> Result<(), DbError> {
        let text = serde_json::to_string(layers).map_err(|e| DbError::Corrupt(e.to_string()))?;
        self.conn().execute(
            "UPDATE vms SET disk_layers = ?2 WHERE id = ?1",
            params![vm_id, text],
        )?;
        Ok(())
    }

    /// Insert a snapshot, or write back every mutable field of an existing one.
    pub fn save_snapshot(&self, s: &SnapshotRecord) -> Result<(), DbError> {
        let layers =
            serde_json::to_string(&s.layers).map_err(|e| DbError::Corrupt(e.to_string()))?;
        let snap = &s.snap;
        self.conn().execute(
            "INSERT INTO snapshots (id, vm_id, status, trigger, created_at, memory_bytes, disk_bytes,
                stored_bytes, pause_ms, error, local, layers, kind, local_used_at, upload_attempts)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
             ON CONFLICT (id) DO UPDATE SET status = excluded.status,
                memory_bytes = excluded.memory_bytes, disk_bytes = excluded.disk_bytes,
                stored_bytes = excluded.stored_bytes, pause_ms = excluded.pause_ms,
                error = excluded.error, local = excluded.local, layers = excluded.layers,
                local_used_at = excluded.local_used_at, upload_attempts = excluded.upload_attempts",
            params![
                snap.id,
                snap.vm_id,
                snap.status.as_str(),
                snap.trigger,
                snap.created_at,
                snap.memory_bytes,
                snap.disk_bytes,
                snap.stored_bytes,
                snap.pause_ms,
                snap.error,
                s.local,
                layers,
                snap.kind.as_str(),
                s.local_used_at,
                s.upload_attempts
            ],
        )?;
        Ok(())
    }

    /// A VM's snapshots, newest first.
    pub fn list_snapshots(&self, vm_id: &str) -> Result<Vec<SnapshotRecord>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{SNAP_SELECT} WHERE vm_id = ?1 ORDER BY created_at DESC, rowid DESC"
        ))?;
        let rows = stmt.query_map([vm_id], snapshot_from_row)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r??);
        }
        Ok(out)
    }

    pub fn get_snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!("{SNAP_SELECT} WHERE id = ?1"))?;
        stmt.query_row([id], snapshot_from_row)
            .optional()?
            .transpose()
    }

    /// Append an event to a VM's history (the newest `EVENTS_KEPT` are kept).
    pub fn add_event(&self, e: &VmEvent) -> Result<(), DbError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO vm_events (vm_id, at, kind, trigger, duration_ms, snapshot_id, error, warnings)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                e.vm_id,
                e.at,
                e.kind,
                e.trigger,
                e.duration_ms,
                e.snapshot_id,
                e.error,
                serde_json::to_string(&e.warnings).unwrap_or_else(|_| "[]".into())
            ],
        )?;
        conn.execute(
            "DELETE FROM vm_events WHERE vm_id = ?1 AND seq <= (SELECT seq FROM vm_events
             WHERE vm_id = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
            params![e.vm_id, EVENTS_KEPT],
        )?;
        Ok(())
    }

    /// A VM's events, newest first.
    pub fn list_events(&self, vm_id: &str) -> Result<Vec<VmEvent>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT vm_id, at, kind, trigger, duration_ms, snapshot_id, error, warnings
             FROM vm_events WHERE vm_id = ?1 ORDER BY seq DESC",
        )?;
        let rows = stmt.query_map([vm_id], |r| {
            Ok(VmEvent {
                vm_id: r.get(0)?,
                at: r.get(1)?,
                kind: r.get(2)?,
                trigger: r.get(3)?,
                duration_ms: r.get(4)?,
                snapshot_id: r.get(5)?,
                error: r.get(6)?,
                // A damaged list loses the warnings, not the event.
                warnings: serde_json::from_str(&r.get::<_, String>(7)?).unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Delete a snapshot record, queueing the deletion of `object` (its
    /// manifest) in the same transaction.
    pub fn delete_snapshot(&self, id: &str, object: &str, now: &str) -> Result<(), DbError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        queue_delete(&tx, object, now)?;
        tx.execute("DELETE FROM snapshots WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }

    pub fn retention(&self, vm_id: &str) -> Result<Retention, DbError> {
        Ok(self.conn().query_row(
            "SELECT keep_last, max_age_seconds FROM vms WHERE id = ?1",
            [vm_id],
            |r| {
                Ok(Retention {
                    keep_last: r.get(0)?,
                    max_age_seconds: r.get(1)?,
                })
            },
        )?)
    }

    pub fn set_retention(&self, vm_id: &str, r: &Retention) -> Result<(), DbError> {
        self.conn().execute(
            "UPDATE vms SET keep_last = ?2, max_age_seconds = ?3 WHERE id = ?1",
            params![vm_id, r.keep_last, r.max_age_seconds],
        )?;
        Ok(())
    }

    // --- routes ---

    pub fn insert_route(&self, route: &Route) -> Result<(), DbError> {
        self.conn().execute(
            "INSERT INTO routes (id, hostname, vm_id, port, auto_wake, idle_timeout_seconds, created_at, idle_ignore_paths)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                route.id,
                route.hostname,
                route.vm_id,
                route.port,
                route.auto_wake,
                route.idle_timeout_seconds,
                route.created_at,
                serde_json::to_string(&route.idle_ignore_paths).unwrap_or_else(|_| "[]".into())
            ],
        )?;
        Ok(())
    }

    pub fn list_routes(&self) -> Result<Vec<Route>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, hostname, vm_id, port, auto_wake, idle_timeout_seconds, created_at, idle_ignore_paths
             FROM routes ORDER BY created_at, id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(Route {
                id: r.get(0)?,
                hostname: r.get(1)?,
                vm_id: r.get(2)?,
                port: r.get(3)?,
                auto_wake: r.get(4)?,
                idle_timeout_seconds: r.get(5)?,
                created_at: r.get(6)?,
                idle_ignore_paths: serde_json::from_str(&r.get::<_, String>(7)?)
                    .unwrap_or_default(),
                vm_state: None,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    pub fn delete_route(&self, id: &str) -> Result<bool, DbError> {
        Ok(self
            .conn()
            .execute("DELETE FROM routes WHERE id = ?1", [id])?
            > 0)
    }

    // --- API keys ---

    pub fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, hash, name, source, created_at FROM api_keys ORDER BY created_at, id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(ApiKeyRecord {
                id: r.get(0)?,
                hash: r.get(1)?,
                name: r.get(2)?,
                source: r.get(3)?,
                created_at: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Add a key; an existing key with the same hash is left as it is.
    pub fn insert_api_key(&self, k: &ApiKeyRecord) -> Result<(), DbError> {
        self.conn().execute(
            "INSERT OR IGNORE INTO api_keys (id, hash, name, source, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![k.id, k.hash, k.name, k.source, k.created_at],
        )?;
        Ok(())
    }

    /// Delete key `id` unless it is the last one, in one transaction (two
    /// revocations at once cannot leave no key). Ok(false): it is the last.
    pub fn delete_api_key_unless_last(&self, id: &str) -> Result<bool, DbError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let count: i64 = tx.query_row("SELECT COUNT(*) FROM api_keys", [], |r| r.get(0))?;
        if count <= 1 {
            return Ok(false);
        }
        tx.execute("DELETE FROM api_keys WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(true)
    }

    /// Revoke every key that came from `HATCH_API_KEY` but `keep` (the
    /// hash of the one set now, if any).
    pub fn revoke_env_keys_except(&self, keep: Option<&[u8]>) -> Result<usize, DbError> {
        Ok(self.conn().execute(
            "DELETE FROM api_keys WHERE source = 'env' AND (?1 IS NULL OR hash != ?1)",
            params![keep],
        )?)
    }

    // --- objects to delete from S3, retried ---

    /// Record a failed attempt to delete `key` (queueing it if need be).
    pub fn add_pending_delete(&self, key: &str, error: &str, now: &str) -> Result<(), DbError> {
        self.conn().execute(
            "INSERT INTO pending_deletes (key, attempts, last_error, added_at) VALUES (?1, 1, ?2, ?3)
             ON CONFLICT (key) DO UPDATE SET attempts = attempts + 1, last_error = excluded.last_error",
            params![key, error, now],
        )?;
        Ok(())
    }

    pub fn pending_deletes(&self) -> Result<Vec<(String, u32)>, DbError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT key, attempts FROM pending_deletes ORDER BY added_at")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    pub fn remove_pending_delete(&self, key: &str) -> Result<(), DbError> {
        self.conn()
            .execute("DELETE FROM pending_deletes WHERE key = ?1", [key])?;
        Ok(())
    }

    /// Snapshots of every VM with `status`, oldest first.
    pub fn snapshots_with_status(
        &self,
        status: SnapshotStatus,
    ) -> Result<Vec<SnapshotRecord>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{SNAP_SELECT} WHERE status = ?1 ORDER BY created_at, rowid"
        ))?;
        let rows = stmt.query_map([status.as_str()], snapshot_from_row)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r??);
        }
        Ok(out)
    }

    /// Every snapshot with a local copy, least recently used first.
    pub fn local_snapshots(&self) -> Result<Vec<SnapshotRecord>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{SNAP_SELECT} WHERE local = 1 ORDER BY COALESCE(local_used_at, created_at), rowid"
        ))?;
        let rows = stmt.query_map([], snapshot_from_row)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r??);
        }
        Ok(out)
    }
}

fn queue_delete(tx: &rusqlite::Transaction<'_>, key: &str, now: &str) -> Result<(), DbError> {
    tx.execute(
        "INSERT OR IGNORE INTO pending_deletes (key, attempts, last_error, added_at) VALUES (?1, 0, NULL, ?2)",
        params![key, now],
    )?;
    Ok(())
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

const SNAP_SELECT: &str = "SELECT id, vm_id, status, trigger, created_at, memory_bytes, disk_bytes,
    stored_bytes, pause_ms, error, local, layers, kind, local_used_at, upload_attempts FROM snapshots";

fn snapshot_from_row(r: &Row<'_>) -> rusqlite::Result<Result<SnapshotRecord, DbError>> {
    let status: String = r.get(2)?;
    let layers: String = r.get(11)?;
    let Some(status) = SnapshotStatus::parse(&status) else {
        return Ok(Err(DbError::Corrupt(format!(
            "unknown snapshot status {status:?}"
        ))));
    };
    let layers = match serde_json::from_str(&layers) {
        Ok(l) => l,
        Err(e) => return Ok(Err(DbError::Corrupt(format!("bad layers: {e}")))),
    };
    let kind: String = r.get(12)?;
    let Some(kind) = SnapshotKind::parse(&kind) else {
        return Ok(Err(DbError::Corrupt(format!(
            "unknown snapshot kind {kind:?}"
        ))));
    };
    Ok(Ok(SnapshotRecord {
        snap: Snapshot {
            id: r.get(0)?,
            vm_id: r.get(1)?,
            kind,
            status,
            trigger: r.get(3)?,
            created_at: r.get(4)?,
            memory_bytes: r.get(5)?,
            disk_bytes: r.get(6)?,
            stored_bytes: r.get(7)?,
            pause_ms: r.get(8)?,
            error: r.get(9)?,
        },
        local: r.get(10)?,
        layers,
        local_used_at: r.get(13)?,
        upload_attempts: r.get(14)?,
    }))
}

const VM_SELECT: &str = "SELECT id, name, state, state_reason, image, vcpus, memory_mib, disk_mib,
    created_at, started_at, boot_ms, forwards FROM vms";

fn vm_from_row(r: &Row<'_>) -> rusqlite::Result<Result<VmRecord, DbError>> {
    let state: String = r.get(2)?;
    let forwards: String = r.get(11)?;
    let Some(state) = VmState::parse(&state) else {
        return Ok(Err(DbError::Corrupt(format!("unknown VM state {state:?}"))));
    };
    let forwards: Vec<PortForward> = match serde_json::from_str(&forwards) {
        Ok(f) => f,
        Err(e) => return Ok(Err(DbError::Corrupt(format!("bad forwards: {e}")))),
    };
    Ok(Ok(VmRecord {
        vm: Vm {
            id: r.get(0)?,
            name: r.get(1)?,
            state,
            state_reason: r.get(3)?,
            image: r.get(4)?,
            vcpus: r.get(5)?,
            memory_mib: r.get(6)?,
            disk_mib: r.get(7)?,
            created_at: r.get(8)?,
            started_at: r.get(9)?,
            boot_ms: r.get(10)?,
            ports: forwards.clone(),
            ready: false,
            idle_timeout_seconds: None,
            idle_timeout_route: None,
        },
        forwards,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(id: &str, name: &str) -> Vm {
        Vm {
            disk_mib: 1024,
            ..Vm::fresh(
                id.into(),
                name.into(),
                VmState::Starting,
                "default".into(),
                "2026-01-01T00:00:00Z".into(),
            )
        }
    }

    #[test]
    fn vm_and_route_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hatch.db");
        {
            let db = Db::open(&path).unwrap();
            db.insert_vm(&vm("vm-1", "web")).unwrap();
            assert!(db.vm_name_taken("web").unwrap());
            db.set_vm_started("vm-1", "t").unwrap();
            db.set_vm_forwards(
                "vm-1",
                &[PortForward {
                    host: 4000,
                    guest: 8080,
                }],
            )
            .unwrap();
            db.set_vm_state("vm-1", VmState::Running, None).unwrap();
            db.insert_route(&Route {
                id: "rt-1".into(),
                hostname: "a.localhost".into(),
                vm_id: "vm-1".into(),
                port: 8080,
                auto_wake: true,
                idle_timeout_seconds: Some(30),
                idle_ignore_paths: vec!["/healthz".into()],
                created_at: "t".into(),
                vm_state: None,
            })
            .unwrap();
        }
        let db = Db::open(&path).unwrap();
        let rec = db.get_vm("vm-1").unwrap().unwrap();
        assert_eq!(rec.vm.state, VmState::Running);
        assert_eq!(
            rec.forwards,
            [PortForward {
                host: 4000,
                guest: 8080
            }]
        );
        let routes = db.list_routes().unwrap();
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].idle_timeout_seconds, Some(30));
        assert_eq!(routes[0].idle_ignore_paths, ["/healthz"]);
        assert!(routes[0].tracks("/counter") && !routes[0].tracks("/healthz/deep"));
        for i in 0..(EVENTS_KEPT + 5) {
            db.add_event(&VmEvent {
                vm_id: "vm-1".into(),
                at: format!("t{i}"),
                kind: "wake".into(),
                trigger: "request".into(),
                duration_ms: Some(i as u64),
                snapshot_id: None,
                error: None,
                warnings: vec![format!("w{i}")],
            })
            .unwrap();
        }
        let events = db.list_events("vm-1").unwrap();
        assert_eq!(events[0].warnings, [format!("w{}", EVENTS_KEPT + 4)]);
        assert_eq!(events.len() as i64, EVENTS_KEPT, "only the newest are kept");
        assert_eq!(
            events[0].at,
            format!("t{}", EVENTS_KEPT + 4),
            "newest first"
        );
        assert_eq!(
            db.delete_vm("vm-1", &["manifests/vm-1/s.json".into()], "t")
                .unwrap(),
            ["a.localhost"]
        );
        assert_eq!(
            db.pending_deletes().unwrap(),
            [("manifests/vm-1/s.json".to_string(), 0)]
        );
        assert!(db.list_events("vm-1").unwrap().is_empty());
        assert!(db.list_routes().unwrap().is_empty());
        assert!(db.get_vm("vm-1").unwrap().is_none());
    }

    /// Keys made before key sources were recorded are `legacy`, which the
    /// HATCH_API_KEY rule never revokes (an upgrade must not lock clients out).
    #[test]
    fn an_upgrade_keeps_the_retention_of_existing_vms() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hatch.db");
        let before = MIGRATIONS.len() - 1;
        {
            let conn = Connection::open(&path).unwrap();
            for sql in &MIGRATIONS[..before] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", before).unwrap();
            conn.execute(
                "INSERT INTO vms (id, name, state, image, vcpus, memory_mib, disk_mib, created_at)
                 VALUES ('vm-old', 'old', 'stopped', 'default', 1, 256, 1024, 't')",
                [],
            )
            .unwrap();
        }
        // Migrated to the newest schema: no default imposed on it.
        let db = Db::open(&path).unwrap();
        assert_eq!(db.retention("vm-old").unwrap(), Retention::default());
    }

    #[test]
    fn keys_from_before_the_source_column_are_legacy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hatch.db");
        {
            let conn = Connection::open(&path).unwrap();
            for sql in &MIGRATIONS[..4] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", 4).unwrap();
            conn.execute(
                "INSERT INTO api_keys (id, hash, created_at) VALUES ('key-old', x'00', 't')",
                [],
            )
            .unwrap();
        }
        let db = Db::open(&path).unwrap();
        assert_eq!(db.api_keys().unwrap()[0].source, "legacy");
        assert_eq!(db.revoke_env_keys_except(None).unwrap(), 0);
    }

    #[test]
    fn names_and_hostnames_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("hatch.db")).unwrap();
        db.insert_vm(&vm("vm-1", "web")).unwrap();
        assert!(db.insert_vm(&vm("vm-2", "web")).is_err());
    }
}
