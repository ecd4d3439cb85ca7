//! The PostgreSQL backend: one database shared by the nodes of a cluster.
//!
//! A small connection pool (deadpool): a lost connection is replaced on the
//! next call, so a database that was unreachable for a while only fails the
//! calls made meanwhile, with a clear error, and nothing else.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use hatch_vmm::PortForward;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::{
    ApiKeyRecord, Claim, EVENTS_KEPT, ImageDeletion, ImageRecord, NodeBeat, NodeRecord,
    PROCESS_STATES, SNAPSHOT_COLUMNS, SnapshotRecord, SnapshotRow, StateStore, StoreError,
    VM_COLUMNS, VmRecord, VmRow, app_column, from_json, to_json,
};
use crate::model::{Retention, Route, SnapshotStatus, Vm, VmEvent, VmState};

/// Schema migrations, applied in order; the `hatch_schema` row records
/// progress. Nodes starting together serialize on an advisory lock.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE vms (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    state_reason TEXT,
    image TEXT NOT NULL,
    vcpus BIGINT NOT NULL,
    memory_mib BIGINT NOT NULL,
    disk_mib BIGINT NOT NULL,
    created_at TEXT NOT NULL,
    started_at TEXT,
    boot_ms BIGINT,
    forwards TEXT NOT NULL DEFAULT '[]',
    disk_layers TEXT NOT NULL DEFAULT '["disk.qcow2"]',
    keep_last BIGINT,
    max_age_seconds BIGINT,
    -- the node that runs the VM or ran it last
    node TEXT,
    -- fencing generation: raised by every change of owner or takeover
    epoch BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE routes (
    id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL UNIQUE,
    vm_id TEXT NOT NULL REFERENCES vms(id),
    port INTEGER NOT NULL,
    auto_wake BOOLEAN NOT NULL,
    idle_timeout_seconds BIGINT,
    created_at TEXT NOT NULL,
    -- path prefixes whose requests neither wake the VM nor keep it awake (JSON list)
    idle_ignore_paths TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    hash BYTEA NOT NULL UNIQUE,
    name TEXT,
    source TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE snapshots (
    -- insertion order: breaks ties between snapshots made in the same second
    seq BIGSERIAL NOT NULL,
    id TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL,
    status TEXT NOT NULL,
    trigger TEXT NOT NULL,
    kind TEXT NOT NULL,
    created_at TEXT NOT NULL,
    memory_bytes BIGINT NOT NULL DEFAULT 0,
    disk_bytes BIGINT NOT NULL DEFAULT 0,
    stored_bytes BIGINT NOT NULL DEFAULT 0,
    pause_ms BIGINT,
    error TEXT,
    local BOOLEAN NOT NULL DEFAULT false,
    layers TEXT NOT NULL DEFAULT '[]',
    local_used_at TEXT,
    upload_attempts BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX snapshots_by_vm ON snapshots (vm_id, created_at);
CREATE TABLE vm_events (
    seq BIGSERIAL PRIMARY KEY,
    vm_id TEXT NOT NULL,
    at TEXT NOT NULL,
    kind TEXT NOT NULL,
    trigger TEXT NOT NULL,
    duration_ms BIGINT,
    snapshot_id TEXT,
    error TEXT,
    warnings TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX vm_events_by_vm ON vm_events (vm_id, seq);
CREATE TABLE pending_deletes (
    key TEXT PRIMARY KEY,
    attempts BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    added_at TEXT NOT NULL
);
CREATE TABLE nodes (
    name TEXT PRIMARY KEY,
    addr TEXT,
    -- up or draining; down is computed from the heartbeat's age
    state TEXT NOT NULL DEFAULT 'up',
    started_at TEXT NOT NULL,
    free_memory_mib BIGINT NOT NULL DEFAULT 0,
    -- the database's clock: nodes' clocks are never compared
    heartbeat_at TIMESTAMPTZ NOT NULL
);
"#,
    r#"
-- An imported image's app settings of the VM (JSON: env, cmd, restart).
ALTER TABLE vms ADD COLUMN app TEXT;
"#,
    r#"
-- Imported images, known to every node of the cluster (files in S3).
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

/// Taken while migrating (any constant both sides agree on).
const MIGRATION_LOCK: i64 = 0x4861_7463_6800;

pub struct PgStore {
    pool: Pool,
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl PgStore {
    /// Connect to `url` (`postgres://user:pass@host:port/db`) and migrate
    /// the schema. Fails if the database cannot be reached now.
    pub async fn connect(url: &str) -> Result<PgStore, StoreError> {
        let mut pg = tokio_postgres::Config::from_str(url)?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(Duration::from_secs(5));
        }
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(16)
            .runtime(Runtime::Tokio1)
            // Well under a lease (half the down time): a heartbeat that waits
            // for a connection fails and is retried instead of fencing the node.
            .wait_timeout(Some(Duration::from_secs(3)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| StoreError::Corrupt(format!("connection pool: {e}")))?;
        let store = PgStore { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS hatch_schema (version BIGINT NOT NULL)")
            .await?;
        let version: i64 = match tx
            .query_opt("SELECT version FROM hatch_schema", &[])
            .await?
        {
            Some(row) => row.try_get(0)?,
            None => {
                tx.execute("INSERT INTO hatch_schema (version) VALUES (0)", &[])
                    .await?;
                0
            }
        };
        let done = usize::try_from(version)
            .map_err(|_| StoreError::Corrupt(format!("schema version {version}")))?;
        if done > MIGRATIONS.len() {
            return Err(StoreError::Corrupt(format!(
                "the database has schema version {done}, newer than this hatch ({}): upgrade hatch",
                MIGRATIONS.len()
            )));
        }
        for sql in &MIGRATIONS[done..] {
            tx.batch_execute(sql).await?;
        }
        tx.execute(
            "UPDATE hatch_schema SET version = $1",
            &[&(MIGRATIONS.len() as i64)],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// After an owner-guarded update of `n` rows: NotOwner if the VM
    /// exists but another node owns it.
    async fn owned(&self, id: &str, n: u64) -> Result<(), StoreError> {
        if n == 0
            && self
                .query_opt("SELECT 1 FROM vms WHERE id = $1", &[&id])
                .await?
                .is_some()
        {
            return Err(StoreError::NotOwner(id.to_string()));
        }
        Ok(())
    }

    async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, StoreError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(sql).await?;
        Ok(client.query(&statement, params).await?)
    }

    async fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, params).await?.into_iter().next())
    }

    async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, StoreError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(sql).await?;
        Ok(client.execute(&statement, params).await?)
    }
}

/// A u64 as PostgreSQL's BIGINT (values past i64::MAX are refused, not wrapped).
fn big(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{v} does not fit a BIGINT")))
}

fn opt_big(v: Option<u64>) -> Result<Option<i64>, StoreError> {
    v.map(big).transpose()
}

/// A BIGINT column read back as an unsigned number (negative = corrupt).
fn unsigned<T: TryFrom<i64>>(row: &Row, idx: usize) -> Result<T, StoreError> {
    let v: i64 = row.try_get(idx)?;
    T::try_from(v).map_err(|_| StoreError::Corrupt(format!("column {idx}: {v} out of range")))
}

fn opt_unsigned<T: TryFrom<i64>>(row: &Row, idx: usize) -> Result<Option<T>, StoreError> {
    let v: Option<i64> = row.try_get(idx)?;
    v.map(|v| {
        T::try_from(v).map_err(|_| StoreError::Corrupt(format!("column {idx}: {v} out of range")))
    })
    .transpose()
}

fn vm_from_row(r: &Row) -> Result<VmRecord, StoreError> {
    VmRow {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        state: r.try_get(2)?,
        state_reason: r.try_get(3)?,
        image: r.try_get(4)?,
        vcpus: unsigned(r, 5)?,
        memory_mib: unsigned(r, 6)?,
        disk_mib: unsigned(r, 7)?,
        created_at: r.try_get(8)?,
        started_at: r.try_get(9)?,
        boot_ms: opt_unsigned(r, 10)?,
        forwards: r.try_get(11)?,
        node: r.try_get(12)?,
        epoch: r.try_get(13)?,
        app: r.try_get(14)?,
    }
    .parse()
}

fn snapshot_from_row(r: &Row) -> Result<SnapshotRecord, StoreError> {
    SnapshotRow {
        id: r.try_get(0)?,
        vm_id: r.try_get(1)?,
        status: r.try_get(2)?,
        trigger: r.try_get(3)?,
        created_at: r.try_get(4)?,
        memory_bytes: unsigned(r, 5)?,
        disk_bytes: unsigned(r, 6)?,
        stored_bytes: unsigned(r, 7)?,
        pause_ms: opt_unsigned(r, 8)?,
        error: r.try_get(9)?,
        local: r.try_get(10)?,
        layers: r.try_get(11)?,
        kind: r.try_get(12)?,
        local_used_at: r.try_get(13)?,
        upload_attempts: unsigned(r, 14)?,
    }
    .parse()
}

/// The compare-and-set of a claim: $1 id, $2 epoch seen, $3 owner seen,
/// $5 seconds the owner must have been silent (NULL: no condition).
const CLAIM_WHERE: &str = "id = $1 AND epoch = $2 AND node IS NOT DISTINCT FROM $3
    AND ($5::float8 IS NULL OR NOT EXISTS (SELECT 1 FROM nodes WHERE name = $3
        AND EXTRACT(EPOCH FROM (now() - heartbeat_at)) <= $5::float8))";

const IMAGE_COLUMNS: &str = "name, id, created_at, node, manifest, details";

fn image_from_row(r: &Row) -> Result<ImageRecord, StoreError> {
    Ok(ImageRecord {
        name: r.try_get(0)?,
        id: r.try_get(1)?,
        created_at: r.try_get(2)?,
        node: r.try_get(3)?,
        manifest: r.try_get(4)?,
        details: r.try_get(5)?,
    })
}

const QUEUE_DELETE: &str = "INSERT INTO pending_deletes (key, attempts, last_error, added_at)
    VALUES ($1, 0, NULL, $2) ON CONFLICT (key) DO NOTHING";

#[async_trait]
impl StateStore for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn insert_vm(&self, vm: &Vm) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO vms (id, name, state, state_reason, image, vcpus, memory_mib, disk_mib, created_at, node, app)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            &[
                &vm.id,
                &vm.name,
                &vm.state.as_str(),
                &vm.state_reason,
                &vm.image,
                &i64::from(vm.vcpus),
                &big(vm.memory_mib)?,
                &big(vm.disk_mib)?,
                &vm.created_at,
                &vm.node,
                &app_column(vm)?,
            ],
        )
        .await?;
        Ok(())
    }

    async fn vm_name_taken(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .query_opt("SELECT 1 FROM vms WHERE name = $1", &[&name])
            .await?
            .is_some())
    }

    async fn vm_id_by_name(&self, name: &str) -> Result<Option<String>, StoreError> {
        match self
            .query_opt("SELECT id FROM vms WHERE name = $1", &[&name])
            .await?
        {
            Some(row) => Ok(Some(row.try_get(0)?)),
            None => Ok(None),
        }
    }

    async fn get_vm(&self, id: &str) -> Result<Option<VmRecord>, StoreError> {
        self.query_opt(
            &format!("SELECT {VM_COLUMNS} FROM vms WHERE id = $1"),
            &[&id],
        )
        .await?
        .as_ref()
        .map(vm_from_row)
        .transpose()
    }

    async fn list_vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        self.query(
            &format!("SELECT {VM_COLUMNS} FROM vms ORDER BY created_at, id"),
            &[],
        )
        .await?
        .iter()
        .map(vm_from_row)
        .collect()
    }

    async fn set_vm_state(
        &self,
        id: &str,
        state: VmState,
        reason: Option<&str>,
        owner: &str,
    ) -> Result<bool, StoreError> {
        let n = self
            .execute(
                "UPDATE vms SET state = $2, state_reason = $3
                 WHERE id = $1 AND (node IS NULL OR node = $4)",
                &[&id, &state.as_str(), &reason, &owner],
            )
            .await?;
        // A VM that is gone altogether is not "taken over".
        Ok(n > 0
            || self
                .query_opt("SELECT 1 FROM vms WHERE id = $1", &[&id])
                .await?
                .is_none())
    }

    async fn claim_vm(&self, c: &Claim<'_>) -> Result<bool, StoreError> {
        let silent = c.from_silent_for.map(|d| d.as_secs_f64());
        Ok(self
            .execute(
                &format!("UPDATE vms SET node = $4, epoch = epoch + 1 WHERE {CLAIM_WHERE}"),
                &[&c.id, &c.seen, &c.from, &c.to, &silent],
            )
            .await?
            > 0)
    }

    async fn take_over_vm(
        &self,
        c: &Claim<'_>,
        state: VmState,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let silent = c.from_silent_for.map(|d| d.as_secs_f64());
        Ok(self
            .execute(
                &format!(
                    "UPDATE vms SET node = $4, epoch = epoch + 1, state = $6, state_reason = $7
                     WHERE {CLAIM_WHERE}"
                ),
                &[
                    &c.id,
                    &c.seen,
                    &c.from,
                    &c.to,
                    &silent,
                    &state.as_str(),
                    &reason,
                ],
            )
            .await?
            > 0)
    }

    async fn set_vm_started(&self, id: &str, started_at: &str) -> Result<(), StoreError> {
        self.execute(
            "UPDATE vms SET started_at = $2, boot_ms = NULL WHERE id = $1",
            &[&id, &started_at],
        )
        .await?;
        Ok(())
    }

    async fn set_vm_forwards(
        &self,
        id: &str,
        forwards: &[PortForward],
        owner: &str,
    ) -> Result<(), StoreError> {
        let n = self
            .execute(
                "UPDATE vms SET forwards = $2 WHERE id = $1 AND (node IS NULL OR node = $3)",
                &[&id, &to_json(&forwards)?, &owner],
            )
            .await?;
        self.owned(id, n).await
    }

    async fn set_vm_boot_ms(&self, id: &str, boot_ms: u64) -> Result<(), StoreError> {
        self.execute(
            "UPDATE vms SET boot_ms = $2 WHERE id = $1",
            &[&id, &big(boot_ms)?],
        )
        .await?;
        Ok(())
    }

    async fn set_vm_node(&self, id: &str, node: &str) -> Result<(), StoreError> {
        self.execute("UPDATE vms SET node = $2 WHERE id = $1", &[&id, &node])
            .await?;
        Ok(())
    }

    async fn delete_vm(
        &self,
        id: &str,
        objects: &[String],
        now: &str,
    ) -> Result<Vec<String>, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        for key in objects {
            tx.execute(QUEUE_DELETE, &[key, &now]).await?;
        }
        let hostnames = tx
            .query(
                "DELETE FROM routes WHERE vm_id = $1 RETURNING hostname",
                &[&id],
            )
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<Vec<String>, _>>()?;
        tx.execute("DELETE FROM snapshots WHERE vm_id = $1", &[&id])
            .await?;
        tx.execute("DELETE FROM vm_events WHERE vm_id = $1", &[&id])
            .await?;
        tx.execute("DELETE FROM vms WHERE id = $1", &[&id]).await?;
        tx.commit().await?;
        Ok(hostnames)
    }

    async fn disk_layers(&self, vm_id: &str) -> Result<Vec<String>, StoreError> {
        let row = self
            .query_opt("SELECT disk_layers FROM vms WHERE id = $1", &[&vm_id])
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("no VM {vm_id}")))?;
        from_json("disk layers", row.try_get(0)?)
    }

    async fn set_disk_layers(
        &self,
        vm_id: &str,
        layers: &[String],
        owner: &str,
    ) -> Result<(), StoreError> {
        let n = self
            .execute(
                "UPDATE vms SET disk_layers = $2 WHERE id = $1 AND (node IS NULL OR node = $3)",
                &[&vm_id, &to_json(&layers)?, &owner],
            )
            .await?;
        self.owned(vm_id, n).await
    }

    async fn save_snapshot(&self, s: &SnapshotRecord) -> Result<(), StoreError> {
        let snap = &s.snap;
        self.execute(
            "INSERT INTO snapshots (id, vm_id, status, trigger, created_at, memory_bytes, disk_bytes,
                stored_bytes, pause_ms, error, local, layers, kind, local_used_at, upload_attempts)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
             ON CONFLICT (id) DO UPDATE SET status = excluded.status,
                memory_bytes = excluded.memory_bytes, disk_bytes = excluded.disk_bytes,
                stored_bytes = excluded.stored_bytes, pause_ms = excluded.pause_ms,
                error = excluded.error, local = excluded.local, layers = excluded.layers,
                local_used_at = excluded.local_used_at, upload_attempts = excluded.upload_attempts",
            &[
                &snap.id,
                &snap.vm_id,
                &snap.status.as_str(),
                &snap.trigger,
                &snap.created_at,
                &big(snap.memory_bytes)?,
                &big(snap.disk_bytes)?,
                &big(snap.stored_bytes)?,
                &opt_big(snap.pause_ms)?,
                &snap.error,
                &s.local,
                &to_json(&s.layers)?,
                &snap.kind.as_str(),
                &s.local_used_at,
                &i64::from(s.upload_attempts),
            ],
        )
        .await?;
        Ok(())
    }

    async fn list_snapshots(&self, vm_id: &str) -> Result<Vec<SnapshotRecord>, StoreError> {
        self.query(
            &format!(
                "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE vm_id = $1
                 ORDER BY created_at DESC, seq DESC"
            ),
            &[&vm_id],
        )
        .await?
        .iter()
        .map(snapshot_from_row)
        .collect()
    }

    async fn get_snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        self.query_opt(
            &format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE id = $1"),
            &[&id],
        )
        .await?
        .as_ref()
        .map(snapshot_from_row)
        .transpose()
    }

    async fn delete_snapshot(&self, id: &str, object: &str, now: &str) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(QUEUE_DELETE, &[&object, &now]).await?;
        tx.execute("DELETE FROM snapshots WHERE id = $1", &[&id])
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn snapshots_with_status(
        &self,
        status: SnapshotStatus,
    ) -> Result<Vec<SnapshotRecord>, StoreError> {
        self.query(
            &format!(
                "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE status = $1 ORDER BY created_at, seq"
            ),
            &[&status.as_str()],
        )
        .await?
        .iter()
        .map(snapshot_from_row)
        .collect()
    }

    async fn local_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        self.query(
            &format!(
                "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE local
                 ORDER BY COALESCE(local_used_at, created_at), seq"
            ),
            &[],
        )
        .await?
        .iter()
        .map(snapshot_from_row)
        .collect()
    }

    async fn retention(&self, vm_id: &str) -> Result<Retention, StoreError> {
        let row = self
            .query_opt(
                "SELECT keep_last, max_age_seconds FROM vms WHERE id = $1",
                &[&vm_id],
            )
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("no VM {vm_id}")))?;
        Ok(Retention {
            keep_last: opt_unsigned(&row, 0)?,
            max_age_seconds: opt_unsigned(&row, 1)?,
        })
    }

    async fn set_retention(&self, vm_id: &str, r: &Retention) -> Result<(), StoreError> {
        self.execute(
            "UPDATE vms SET keep_last = $2, max_age_seconds = $3 WHERE id = $1",
            &[
                &vm_id,
                &r.keep_last.map(i64::from),
                &opt_big(r.max_age_seconds)?,
            ],
        )
        .await?;
        Ok(())
    }

    async fn add_event(&self, e: &VmEvent) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO vm_events (vm_id, at, kind, trigger, duration_ms, snapshot_id, error, warnings)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &e.vm_id,
                &e.at,
                &e.kind,
                &e.trigger,
                &opt_big(e.duration_ms)?,
                &e.snapshot_id,
                &e.error,
                &to_json(&e.warnings)?,
            ],
        )
        .await?;
        tx.execute(
            "DELETE FROM vm_events WHERE vm_id = $1 AND seq <= (SELECT seq FROM vm_events
             WHERE vm_id = $1 ORDER BY seq DESC LIMIT 1 OFFSET $2)",
            &[&e.vm_id, &EVENTS_KEPT],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_events(&self, vm_id: &str) -> Result<Vec<VmEvent>, StoreError> {
        self.query(
            "SELECT vm_id, at, kind, trigger, duration_ms, snapshot_id, error, warnings
             FROM vm_events WHERE vm_id = $1 ORDER BY seq DESC",
            &[&vm_id],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(VmEvent {
                vm_id: r.try_get(0)?,
                at: r.try_get(1)?,
                kind: r.try_get(2)?,
                trigger: r.try_get(3)?,
                duration_ms: opt_unsigned(r, 4)?,
                snapshot_id: r.try_get(5)?,
                error: r.try_get(6)?,
                // A damaged list loses the warnings, not the event.
                warnings: serde_json::from_str(r.try_get(7)?).unwrap_or_default(),
            })
        })
        .collect()
    }

    async fn insert_route(&self, route: &Route) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO routes (id, hostname, vm_id, port, auto_wake, idle_timeout_seconds, created_at, idle_ignore_paths)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &route.id,
                &route.hostname,
                &route.vm_id,
                &i32::from(route.port),
                &route.auto_wake,
                &opt_big(route.idle_timeout_seconds)?,
                &route.created_at,
                &to_json(&route.idle_ignore_paths)?,
            ],
        )
        .await?;
        Ok(())
    }

    async fn list_routes(&self) -> Result<Vec<Route>, StoreError> {
        self.query(
            "SELECT id, hostname, vm_id, port, auto_wake, idle_timeout_seconds, created_at, idle_ignore_paths
             FROM routes ORDER BY created_at, id",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            let port: i32 = r.try_get(3)?;
            Ok(Route {
                id: r.try_get(0)?,
                hostname: r.try_get(1)?,
                vm_id: r.try_get(2)?,
                port: u16::try_from(port)
                    .map_err(|_| StoreError::Corrupt(format!("route port {port}")))?,
                auto_wake: r.try_get(4)?,
                idle_timeout_seconds: opt_unsigned(r, 5)?,
                created_at: r.try_get(6)?,
                idle_ignore_paths: serde_json::from_str(r.try_get(7)?).unwrap_or_default(),
                vm_state: None,
            })
        })
        .collect()
    }

    async fn delete_route(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .execute("DELETE FROM routes WHERE id = $1", &[&id])
            .await?
            > 0)
    }

    async fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.query(
            "SELECT id, hash, name, source, created_at FROM api_keys ORDER BY created_at, id",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(ApiKeyRecord {
                id: r.try_get(0)?,
                hash: r.try_get(1)?,
                name: r.try_get(2)?,
                source: r.try_get(3)?,
                created_at: r.try_get(4)?,
            })
        })
        .collect()
    }

    async fn insert_api_key(&self, k: &ApiKeyRecord) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO api_keys (id, hash, name, source, created_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT DO NOTHING",
            &[&k.id, &k.hash, &k.name, &k.source, &k.created_at],
        )
        .await?;
        Ok(())
    }

    async fn delete_api_key_unless_last(&self, id: &str) -> Result<bool, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // Two revocations on two nodes at once: the table lock makes the
        // second see the first's deletion.
        tx.batch_execute("LOCK TABLE api_keys IN EXCLUSIVE MODE")
            .await?;
        let count: i64 = tx
            .query_one("SELECT COUNT(*) FROM api_keys", &[])
            .await?
            .try_get(0)?;
        if count <= 1 {
            return Ok(false);
        }
        tx.execute("DELETE FROM api_keys WHERE id = $1", &[&id])
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn revoke_env_keys_except(&self, keep: Option<&[u8]>) -> Result<usize, StoreError> {
        let n = self
            .execute(
                "DELETE FROM api_keys WHERE source = 'env' AND ($1::BYTEA IS NULL OR hash != $1)",
                &[&keep],
            )
            .await?;
        Ok(n as usize)
    }

    async fn heartbeat(&self, beat: &NodeBeat) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO nodes (name, addr, started_at, free_memory_mib, heartbeat_at)
             VALUES ($1, $2, $3, $4, now())
             ON CONFLICT (name) DO UPDATE SET addr = excluded.addr, started_at = excluded.started_at,
                free_memory_mib = excluded.free_memory_mib, heartbeat_at = now()",
            &[
                &beat.name,
                &beat.addr,
                &beat.started_at,
                &big(beat.free_memory_mib)?,
            ],
        )
        .await?;
        Ok(())
    }

    async fn set_node_state(&self, name: &str, state: &str) -> Result<bool, StoreError> {
        Ok(self
            .execute(
                "UPDATE nodes SET state = $2 WHERE name = $1",
                &[&name, &state],
            )
            .await?
            > 0)
    }

    async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.query(
            &format!(
                "SELECT name, addr, state, started_at, free_memory_mib,
                    to_char(heartbeat_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    EXTRACT(EPOCH FROM (now() - heartbeat_at))::float8,
                    (SELECT COUNT(*) FROM vms WHERE vms.node = nodes.name
                        AND vms.state IN ({PROCESS_STATES}))
                 FROM nodes ORDER BY name"
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            let silent: f64 = r.try_get(6)?;
            Ok(NodeRecord {
                name: r.try_get(0)?,
                addr: r.try_get(1)?,
                state: r.try_get(2)?,
                started_at: r.try_get(3)?,
                free_memory_mib: unsigned(r, 4)?,
                heartbeat_at: r.try_get(5)?,
                silent_for: std::time::Duration::from_secs_f64(silent.max(0.0)),
                vms: unsigned(r, 7)?,
            })
        })
        .collect()
    }

    async fn add_pending_delete(
        &self,
        key: &str,
        error: &str,
        now: &str,
    ) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO pending_deletes (key, attempts, last_error, added_at) VALUES ($1, 1, $2, $3)
             ON CONFLICT (key) DO UPDATE SET attempts = pending_deletes.attempts + 1,
                last_error = excluded.last_error",
            &[&key, &error, &now],
        )
        .await?;
        Ok(())
    }

    async fn insert_image(&self, i: &ImageRecord) -> Result<bool, StoreError> {
        Ok(self
            .execute(
                "INSERT INTO images (name, id, created_at, node, manifest, details)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING",
                &[
                    &i.name,
                    &i.id,
                    &i.created_at,
                    &i.node,
                    &i.manifest,
                    &i.details,
                ],
            )
            .await?
            > 0)
    }

    async fn get_image(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        self.query_opt(
            &format!("SELECT {IMAGE_COLUMNS} FROM images WHERE name = $1"),
            &[&name],
        )
        .await?
        .as_ref()
        .map(image_from_row)
        .transpose()
    }

    async fn list_images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        self.query(
            &format!("SELECT {IMAGE_COLUMNS} FROM images ORDER BY name"),
            &[],
        )
        .await?
        .iter()
        .map(image_from_row)
        .collect()
    }

    async fn delete_image(&self, name: &str, now: &str) -> Result<ImageDeletion, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // The row stays locked until the end: two deletions do not both
        // queue the manifest, and a deletion sees every VM committed
        // before it.
        let Some(row) = tx
            .query_opt(
                "SELECT manifest FROM images WHERE name = $1 FOR UPDATE",
                &[&name],
            )
            .await?
        else {
            return Ok(ImageDeletion::NotFound);
        };
        let manifest: Option<String> = row.try_get(0)?;
        let users: Vec<String> = tx
            .query("SELECT id FROM vms WHERE image = $1 ORDER BY id", &[&name])
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        if !users.is_empty() {
            return Ok(ImageDeletion::InUse(users));
        }
        if let Some(key) = &manifest {
            tx.execute(QUEUE_DELETE, &[key, &now]).await?;
        }
        tx.execute("DELETE FROM images WHERE name = $1", &[&name])
            .await?;
        tx.commit().await?;
        Ok(ImageDeletion::Deleted)
    }

    async fn pending_deletes(&self) -> Result<Vec<(String, u32)>, StoreError> {
        self.query(
            "SELECT key, attempts FROM pending_deletes ORDER BY added_at, key",
            &[],
        )
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, unsigned(r, 1)?)))
        .collect()
    }

    async fn remove_pending_delete(&self, key: &str) -> Result<(), StoreError> {
        self.execute("DELETE FROM pending_deletes WHERE key = $1", &[&key])
            .await?;
        Ok(())
    }
}
