//! The SQLite backend: one host, `<data-dir>/hatch.db`.
//!
//! One connection behind a std Mutex: every statement is short and none is
//! held across an await, so an async lock would only add overhead.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{
    ApiKeyRecord, Claim, EVENTS_KEPT, ImageDeletion, ImageRecord, NodeBeat, NodeRecord,
    PROCESS_STATES, SNAPSHOT_COLUMNS, SnapshotRecord, SnapshotRow, StateStore, StoreError,
    VM_COLUMNS, VmRecord, VmRow, app_column, from_json, to_json,
};
use crate::model::{Retention, Route, SnapshotStatus, Vm, VmEvent, VmState};
use hatch_vmm::PortForward;

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
    r#"
-- The node that runs the VM or ran it last (NULL: from before nodes).
ALTER TABLE vms ADD COLUMN node TEXT;
-- fencing generation: raised by every change of owner or takeover
ALTER TABLE vms ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
CREATE TABLE nodes (
    name TEXT PRIMARY KEY,
    addr TEXT,
    state TEXT NOT NULL DEFAULT 'up',
    started_at TEXT NOT NULL,
    free_memory_mib INTEGER NOT NULL DEFAULT 0,
    heartbeat_at TEXT NOT NULL,
    -- the same instant as unix seconds, for computing its age
    heartbeat_unix REAL NOT NULL
);
"#,
    r#"
-- An imported image's app settings of the VM (JSON: env, cmd, restart).
ALTER TABLE vms ADD COLUMN app TEXT;
"#,
    r#"
-- Imported images, known to every node of a cluster (files in S3).
CREATE TABLE images (
    name TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    node TEXT NOT NULL,
    manifest TEXT,
    details TEXT NOT NULL
);
"#,
];

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // With WAL, NORMAL stays consistent after a crash and avoids an fsync
        // per state change on the async workers.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let db = SqliteStore {
            conn: Mutex::new(conn),
        };
        db.migrate()?;
        Ok(db)
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic mid-statement leaves SQLite itself consistent.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn migrate(&self) -> Result<(), StoreError> {
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
}

#[async_trait]
impl StateStore for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn insert_vm(&self, vm: &Vm) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO vms (id, name, state, state_reason, image, vcpus, memory_mib, disk_mib, created_at, node, app)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                vm.id,
                vm.name,
                vm.state.as_str(),
                vm.state_reason,
                vm.image,
                vm.vcpus,
                vm.memory_mib,
                vm.disk_mib,
                vm.created_at,
                vm.node,
                app_column(vm)?
            ],
        )?;
        Ok(())
    }

    async fn vm_name_taken(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT 1 FROM vms WHERE name = ?1", [name], |_| Ok(()))
            .optional()?
            .is_some())
    }

    async fn vm_id_by_name(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT id FROM vms WHERE name = ?1", [name], |r| r.get(0))
            .optional()?)
    }

    async fn get_vm(&self, id: &str) -> Result<Option<VmRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached(&format!("SELECT {VM_COLUMNS} FROM vms WHERE id = ?1"))?;
        let rec = stmt.query_row([id], vm_from_row).optional()?;
        rec.transpose()
    }

    async fn list_vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {VM_COLUMNS} FROM vms ORDER BY created_at, id"
        ))?;
        let rows = stmt.query_map([], vm_from_row)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r??);
        }
        Ok(out)
    }

    async fn set_vm_state(
        &self,
        id: &str,
        state: VmState,
        reason: Option<&str>,
        owner: &str,
    ) -> Result<bool, StoreError> {
        let conn = self.conn();
        let n = conn.execute(
            "UPDATE vms SET state = ?2, state_reason = ?3
             WHERE id = ?1 AND (node IS NULL OR node = ?4)",
            params![id, state.as_str(), reason, owner],
        )?;
        // A VM that is gone altogether is not "taken over".
        Ok(n > 0
            || conn
                .query_row("SELECT 1 FROM vms WHERE id = ?1", [id], |_| Ok(()))
                .optional()?
                .is_none())
    }

    async fn claim_vm(&self, c: &Claim<'_>) -> Result<bool, StoreError> {
        Ok(self.conn().execute(
            &format!("UPDATE vms SET node = ?4, epoch = epoch + 1 WHERE {CLAIM_WHERE}"),
            params![
                c.id,
                c.seen,
                c.from,
                c.to,
                c.from_silent_for.map(|d| d.as_secs_f64()),
                unix_now()
            ],
        )? > 0)
    }

    async fn take_over_vm(
        &self,
        c: &Claim<'_>,
        state: VmState,
        reason: &str,
    ) -> Result<bool, StoreError> {
        Ok(self.conn().execute(
            &format!(
                "UPDATE vms SET node = ?4, epoch = epoch + 1, state = ?7, state_reason = ?8
                 WHERE {CLAIM_WHERE}"
            ),
            params![
                c.id,
                c.seen,
                c.from,
                c.to,
                c.from_silent_for.map(|d| d.as_secs_f64()),
                unix_now(),
                state.as_str(),
                reason
            ],
        )? > 0)
    }

    async fn set_vm_started(&self, id: &str, started_at: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE vms SET started_at = ?2, boot_ms = NULL WHERE id = ?1",
            params![id, started_at],
        )?;
        Ok(())
    }

    async fn set_vm_forwards(
        &self,
        id: &str,
        forwards: &[PortForward],
        owner: &str,
    ) -> Result<(), StoreError> {
        let forwards = to_json(&forwards)?;
        let conn = self.conn();
        let n = conn.execute(
            "UPDATE vms SET forwards = ?2 WHERE id = ?1 AND (node IS NULL OR node = ?3)",
            params![id, forwards, owner],
        )?;
        owned(&conn, id, n)
    }

    async fn set_vm_boot_ms(&self, id: &str, boot_ms: u64) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE vms SET boot_ms = ?2 WHERE id = ?1",
            params![id, boot_ms],
        )?;
        Ok(())
    }

    async fn set_vm_node(&self, id: &str, node: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("UPDATE vms SET node = ?2 WHERE id = ?1", params![id, node])?;
        Ok(())
    }

    async fn delete_vm(
        &self,
        id: &str,
        objects: &[String],
        now: &str,
    ) -> Result<Vec<String>, StoreError> {
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

    async fn disk_layers(&self, vm_id: &str) -> Result<Vec<String>, StoreError> {
        let text: String =
            self.conn()
                .query_row("SELECT disk_layers FROM vms WHERE id = ?1", [vm_id], |r| {
                    r.get(0)
                })?;
        from_json("disk layers", &text)
    }

    async fn set_disk_layers(
        &self,
        vm_id: &str,
        layers: &[String],
        owner: &str,
    ) -> Result<(), StoreError> {
        let text = to_json(&layers)?;
        let conn = self.conn();
        let n = conn.execute(
            "UPDATE vms SET disk_layers = ?2 WHERE id = ?1 AND (node IS NULL OR node = ?3)",
            params![vm_id, text, owner],
        )?;
        owned(&conn, vm_id, n)
    }

    async fn save_snapshot(&self, s: &SnapshotRecord) -> Result<(), StoreError> {
        let layers = to_json(&s.layers)?;
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

    async fn list_snapshots(&self, vm_id: &str) -> Result<Vec<SnapshotRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE vm_id = ?1 ORDER BY created_at DESC, rowid DESC"
        ))?;
        let rows = stmt.query_map([vm_id], snapshot_from_row)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r??);
        }
        Ok(out)
    }

    async fn get_snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE id = ?1"
        ))?;
        stmt.query_row([id], snapshot_from_row)
            .optional()?
            .transpose()
    }

    async fn add_event(&self, e: &VmEvent) -> Result<(), StoreError> {
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

    async fn list_events(&self, vm_id: &str) -> Result<Vec<VmEvent>, StoreError> {
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

    async fn delete_snapshot(&self, id: &str, object: &str, now: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        queue_delete(&tx, object, now)?;
        tx.execute("DELETE FROM snapshots WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }

    async fn retention(&self, vm_id: &str) -> Result<Retention, StoreError> {
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

    async fn set_retention(&self, vm_id: &str, r: &Retention) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE vms SET keep_last = ?2, max_age_seconds = ?3 WHERE id = ?1",
            params![vm_id, r.keep_last, r.max_age_seconds],
        )?;
        Ok(())
    }

    // --- routes ---

    async fn insert_route(&self, route: &Route) -> Result<(), StoreError> {
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

    async fn list_routes(&self) -> Result<Vec<Route>, StoreError> {
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

    async fn delete_route(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .execute("DELETE FROM routes WHERE id = ?1", [id])?
            > 0)
    }

    // --- API keys ---

    async fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
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

    async fn insert_api_key(&self, k: &ApiKeyRecord) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT OR IGNORE INTO api_keys (id, hash, name, source, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![k.id, k.hash, k.name, k.source, k.created_at],
        )?;
        Ok(())
    }

    async fn delete_api_key_unless_last(&self, id: &str) -> Result<bool, StoreError> {
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

    async fn revoke_env_keys_except(&self, keep: Option<&[u8]>) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            "DELETE FROM api_keys WHERE source = 'env' AND (?1 IS NULL OR hash != ?1)",
            params![keep],
        )?)
    }

    // --- objects to delete from S3, retried ---

    async fn heartbeat(&self, beat: &NodeBeat) -> Result<(), StoreError> {
        let now = std::time::SystemTime::now();
        let unix = now
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.conn().execute(
            "INSERT INTO nodes (name, addr, started_at, free_memory_mib, heartbeat_at, heartbeat_unix)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (name) DO UPDATE SET addr = excluded.addr, started_at = excluded.started_at,
                free_memory_mib = excluded.free_memory_mib, heartbeat_at = excluded.heartbeat_at,
                heartbeat_unix = excluded.heartbeat_unix",
            params![
                beat.name,
                beat.addr,
                beat.started_at,
                beat.free_memory_mib,
                humantime::format_rfc3339_seconds(now).to_string(),
                unix
            ],
        )?;
        Ok(())
    }

    async fn set_node_state(&self, name: &str, state: &str) -> Result<bool, StoreError> {
        Ok(self.conn().execute(
            "UPDATE nodes SET state = ?2 WHERE name = ?1",
            params![name, state],
        )? > 0)
    }

    async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT name, addr, state, started_at, free_memory_mib, heartbeat_at, heartbeat_unix,
                (SELECT COUNT(*) FROM vms WHERE vms.node = nodes.name AND vms.state IN ({PROCESS_STATES}))
             FROM nodes ORDER BY name"
        ))?;
        let rows = stmt.query_map([], |r| {
            let beat: f64 = r.get(6)?;
            Ok(NodeRecord {
                name: r.get(0)?,
                addr: r.get(1)?,
                state: r.get(2)?,
                started_at: r.get(3)?,
                free_memory_mib: r.get(4)?,
                heartbeat_at: r.get(5)?,
                silent_for: std::time::Duration::from_secs_f64((now - beat).max(0.0)),
                vms: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    async fn add_pending_delete(
        &self,
        key: &str,
        error: &str,
        now: &str,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO pending_deletes (key, attempts, last_error, added_at) VALUES (?1, 1, ?2, ?3)
             ON CONFLICT (key) DO UPDATE SET attempts = attempts + 1, last_error = excluded.last_error",
            params![key, error, now],
        )?;
        Ok(())
    }

    async fn insert_image(&self, i: &ImageRecord) -> Result<bool, StoreError> {
        Ok(self.conn().execute(
            "INSERT OR IGNORE INTO images (name, id, created_at, node, manifest, details)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![i.name, i.id, i.created_at, i.node, i.manifest, i.details],
        )? > 0)
    }

    async fn get_image(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {IMAGE_COLUMNS} FROM images WHERE name = ?1"
        ))?;
        Ok(stmt.query_row([name], image_from_row).optional()?)
    }

    async fn list_images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached(&format!("SELECT {IMAGE_COLUMNS} FROM images ORDER BY name"))?;
        let rows = stmt.query_map([], image_from_row)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    async fn delete_image(&self, name: &str, now: &str) -> Result<ImageDeletion, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let manifest: Option<Option<String>> = tx
            .query_row("SELECT manifest FROM images WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        let Some(manifest) = manifest else {
            return Ok(ImageDeletion::NotFound);
        };
        let users = {
            let mut stmt = tx.prepare("SELECT id FROM vms WHERE image = ?1 ORDER BY id")?;
            let rows = stmt.query_map([name], |r| r.get::<_, String>(0))?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        if !users.is_empty() {
            return Ok(ImageDeletion::InUse(users));
        }
        if let Some(key) = manifest {
            queue_delete(&tx, &key, now)?;
        }
        tx.execute("DELETE FROM images WHERE name = ?1", [name])?;
        tx.commit()?;
        Ok(ImageDeletion::Deleted)
    }

    async fn pending_deletes(&self) -> Result<Vec<(String, u32)>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT key, attempts FROM pending_deletes ORDER BY added_at")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    async fn remove_pending_delete(&self, key: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM pending_deletes WHERE key = ?1", [key])?;
        Ok(())
    }

    async fn snapshots_with_status(
        &self,
        status: SnapshotStatus,
    ) -> Result<Vec<SnapshotRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE status = ?1 ORDER BY created_at, rowid"
        ))?;
        let rows = stmt.query_map([status.as_str()], snapshot_from_row)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r??);
        }
        Ok(out)
    }

    async fn local_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE local = 1 ORDER BY COALESCE(local_used_at, created_at), rowid"
        ))?;
        let rows = stmt.query_map([], snapshot_from_row)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r??);
        }
        Ok(out)
    }
}

/// After an owner-guarded update of `n` rows: NotOwner if the VM exists
/// but another node owns it.
fn owned(conn: &Connection, id: &str, n: usize) -> Result<(), StoreError> {
    if n == 0
        && conn
            .query_row("SELECT 1 FROM vms WHERE id = ?1", [id], |_| Ok(()))
            .optional()?
            .is_some()
    {
        return Err(StoreError::NotOwner(id.to_string()));
    }
    Ok(())
}

/// The compare-and-set of a claim: ?1 id, ?2 epoch seen, ?3 owner seen,
/// ?5 seconds the owner must have been silent (NULL: no condition), ?6 now.
const CLAIM_WHERE: &str = "id = ?1 AND epoch = ?2 AND node IS ?3
    AND (?5 IS NULL OR NOT EXISTS (SELECT 1 FROM nodes WHERE name = ?3
        AND ?6 - heartbeat_unix <= ?5))";

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

const IMAGE_COLUMNS: &str = "name, id, created_at, node, manifest, details";

fn image_from_row(r: &Row<'_>) -> rusqlite::Result<ImageRecord> {
    Ok(ImageRecord {
        name: r.get(0)?,
        id: r.get(1)?,
        created_at: r.get(2)?,
        node: r.get(3)?,
        manifest: r.get(4)?,
        details: r.get(5)?,
    })
}

fn queue_delete(tx: &rusqlite::Transaction<'_>, key: &str, now: &str) -> Result<(), StoreError> {
    tx.execute(
        "INSERT OR IGNORE INTO pending_deletes (key, attempts, last_error, added_at) VALUES (?1, 0, NULL, ?2)",
        params![key, now],
    )?;
    Ok(())
}

fn snapshot_from_row(r: &Row<'_>) -> rusqlite::Result<Result<SnapshotRecord, StoreError>> {
    Ok(SnapshotRow {
        id: r.get(0)?,
        vm_id: r.get(1)?,
        status: r.get(2)?,
        trigger: r.get(3)?,
        created_at: r.get(4)?,
        memory_bytes: r.get(5)?,
        disk_bytes: r.get(6)?,
        stored_bytes: r.get(7)?,
        pause_ms: r.get(8)?,
        error: r.get(9)?,
        local: r.get(10)?,
        layers: r.get(11)?,
        kind: r.get(12)?,
        local_used_at: r.get(13)?,
        upload_attempts: r.get(14)?,
    }
    .parse())
}

fn vm_from_row(r: &Row<'_>) -> rusqlite::Result<Result<VmRecord, StoreError>> {
    Ok(VmRow {
        id: r.get(0)?,
        name: r.get(1)?,
        state: r.get(2)?,
        state_reason: r.get(3)?,
        image: r.get(4)?,
        vcpus: r.get(5)?,
        memory_mib: r.get(6)?,
        disk_mib: r.get(7)?,
        created_at: r.get(8)?,
        started_at: r.get(9)?,
        boot_ms: r.get(10)?,
        forwards: r.get(11)?,
        node: r.get(12)?,
        epoch: r.get(13)?,
        app: r.get(14)?,
    }
    .parse())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_store_suite_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hatch.db");
        {
            let store = SqliteStore::open(&path).unwrap();
            super::super::conformance::run(&store).await;
        }
        let store = SqliteStore::open(&path).unwrap();
        assert!(store.get_vm("vm-a1").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn an_upgrade_keeps_the_retention_of_existing_vms() {
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
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(
            store.retention("vm-old").await.unwrap(),
            Retention::default()
        );
    }

    /// Keys made before key sources were recorded are `legacy`, which the
    /// HATCH_API_KEY rule never revokes (an upgrade must not lock clients out).
    #[tokio::test]
    async fn keys_from_before_the_source_column_are_legacy() {
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
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.api_keys().await.unwrap()[0].source, "legacy");
        assert_eq!(store.revoke_env_keys_except(None).await.unwrap(), 0);
    }
}
