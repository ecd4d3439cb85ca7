//! Daemon configuration: one struct with named defaults. The CLI fills it from
//! flags, environment variables (`HATCH_*`) and an optional TOML file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use hatch_vmm::AccelChoice;

/// A secret setting (API key, S3 secret, snapshot signing secret). Its
/// `Debug` never shows the value, so no log line or error can print it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub api_addr: SocketAddr,
    pub proxy_addr: SocketAddr,
    /// Where images live; default `<data-dir>/images`.
    pub images_dir: PathBuf,
    /// Where QMP and agent sockets and pid files live; default a tmpfs
    /// directory (short paths for unix sockets).
    pub run_dir: PathBuf,
    pub qemu_binary: PathBuf,
    pub accel: AccelChoice,
    /// How long `stop` waits for QEMU to exit before killing it.
    pub stop_timeout: Duration,
    /// API key from the environment; valid while it is set (see `auth`).
    pub api_key: Option<Secret>,
    /// S3 settings; snapshots need them.
    pub s3: Option<S3Config>,
    /// `postgres://...`: keep state in PostgreSQL (shared by the nodes of a
    /// cluster) instead of SQLite in the data dir. Secret: it may carry a
    /// password.
    pub database_url: Option<Secret>,
    /// This daemon's name in the cluster (`--node-name`); default the host name.
    pub node_name: String,
    /// Where other nodes reach this one (`--cluster-addr`), shown in `GET /nodes`.
    pub cluster_addr: Option<SocketAddr>,
    /// Shared by the nodes of a cluster; authenticates node-to-node calls.
    pub cluster_secret: Option<Secret>,
    /// A node not heard from for this long is `down`.
    pub node_down_after: Duration,
    /// QEMU `-cpu` model (`--cpu-model`); None: `host` under KVM, `max`
    /// under TCG. Recorded in snapshot manifests and checked on restore.
    pub cpu_model: Option<String>,
    /// VMs' outbound network: tap where the host allows, or user-mode only.
    pub network: crate::network::Choice,
    /// Unreferenced chunks younger than this are kept by garbage collection.
    pub gc_grace: Duration,
    /// How long a proxied request waits for its VM to wake before 503.
    pub wake_timeout: Duration,
    /// Requests held per VM while it wakes; more get 503 at once.
    pub wake_queue: usize,
    /// A disk chain longer than this is flattened after a restore.
    pub max_disk_layers: usize,
    /// Signs snapshot manifests; daemons sharing a bucket share it. None: a
    /// secret generated on first start in `<data-dir>/snapshot-secret`.
    pub snapshot_secret: Option<Secret>,
    /// Earlier secrets: manifests they signed still verify (rotation).
    pub previous_snapshot_secrets: Vec<Secret>,
    /// Longest any QMP command may take before QEMU counts as hung.
    pub qmp_timeout: Duration,
    /// Longest a restore waits for the guest agent to confirm that the
    /// clock is set and the RNG reseeded (retrying meanwhile).
    pub agent_sync_timeout: Duration,
    /// Longest pause between attempts of a failing upload.
    pub upload_retry_max: Duration,
    /// Bytes that local copies of snapshots may take in the data dir; None:
    /// 40% of its file system. Copies already in S3 are evicted beyond it.
    pub local_cache_bytes: Option<u64>,
    /// A second images directory looked in after `images_dir` (the cache
    /// the set-up scripts build the default image into).
    pub image_cache_dir: Option<PathBuf>,
    /// A wake from S3 starts the guest before its memory is all here,
    /// fetching the rest on demand and in the background (`snapshot/lazy.rs`).
    pub lazy_memory: bool,
    /// Longest a capture of a lazily woken VM waits for the rest of its
    /// memory to arrive from S3 before failing (the VM runs on).
    pub lazy_fill_timeout: Duration,
    /// Least time between two background fetches of a lazy wake (zero: no
    /// limit), leaving S3's bandwidth to the guest's own demand fetches.
    pub lazy_fill_pace: Duration,
    /// Suspended VMs (the most recently uploaded) that get a standby QEMU
    /// waiting for their next wake from the local copy (~16 MiB each, no
    /// CPU); 0: none (`supervisor/standby.rs`).
    pub standby_qemus: usize,
    /// A suspend keeps its QEMU, paused, as the VM's standby (a wake then
    /// only lets it run); false: standbys are started after the upload.
    pub standby_warm: bool,
    /// Test-only fault injection rules (`fault.rs`); empty in production.
    pub faults: String,
}

#[derive(Clone)]
pub struct S3Config {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: Secret,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key)
            .finish()
    }
}

impl Config {
    /// A configuration with every default, for `data_dir`.
    pub fn new(data_dir: PathBuf) -> Config {
        Config {
            images_dir: data_dir.join("images"),
            run_dir: default_run_dir(&data_dir),
            data_dir,
            api_addr: SocketAddr::from(([127, 0, 0, 1], 7070)),
            proxy_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            accel: AccelChoice::Auto,
            stop_timeout: Duration::from_secs(10),
            api_key: None,
            s3: None,
            database_url: None,
            node_name: default_node_name(),
            cluster_addr: None,
            cluster_secret: None,
            node_down_after: Duration::from_secs(15),
            cpu_model: None,
            network: crate::network::Choice::Auto,
            gc_grace: Duration::from_secs(3600),
            wake_timeout: Duration::from_secs(30),
            wake_queue: 4096,
            max_disk_layers: 8,
            snapshot_secret: None,
            previous_snapshot_secrets: Vec::new(),
            qmp_timeout: Duration::from_secs(30),
            agent_sync_timeout: Duration::from_secs(20),
            upload_retry_max: Duration::from_secs(300),
            lazy_memory: true,
            lazy_fill_timeout: Duration::from_secs(60),
            lazy_fill_pace: Duration::ZERO,
            standby_qemus: 8,
            standby_warm: true,
            local_cache_bytes: None,
            image_cache_dir: default_image_cache_dir(),
            faults: String::new(),
        }
    }
}

/// Node names: 1-63 letters, digits, '.', '_' or '-' (they appear in URLs
/// and logs).
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The host name (a node's default name), or `hatch` if it cannot be read.
pub fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "hatch".to_string())
}

/// `$HATCH_CACHE_DIR/images`, else `~/.cache/hatch/images`: where
/// `scripts/up.sh` and `scripts/test.sh` build the default image.
pub fn default_image_cache_dir() -> Option<PathBuf> {
    let cache = std::env::var_os("HATCH_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/hatch")))?;
    Some(cache.join("images"))
}

/// `/dev/shm/hatch-<hash of the data dir>`: one per daemon, stable across restarts.
pub fn default_run_dir(data_dir: &std::path::Path) -> PathBuf {
    let canonical = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let hash = blake3::hash(canonical.as_os_str().as_encoded_bytes()).to_hex();
    PathBuf::from("/dev/shm").join(format!("hatch-{}", &hash[..12]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_secrets() {
        let mut cfg = Config::new(PathBuf::from("/tmp/x"));
        cfg.api_key = Some(Secret::new("hatch_api_key_value_123"));
        cfg.snapshot_secret = Some(Secret::new("snapshot-secret-value"));
        cfg.previous_snapshot_secrets = vec![Secret::new("old-secret-value")];
        cfg.database_url = Some(Secret::new("postgres://u:db-password@h/d"));
        cfg.cluster_secret = Some(Secret::new("cluster-secret-value"));
        cfg.s3 = Some(S3Config {
            endpoint: "http://127.0.0.1:3900".into(),
            bucket: "b".into(),
            region: "r".into(),
            access_key_id: "GK123".into(),
            secret_access_key: Secret::new("s3-secret-value"),
        });
        let shown = format!("{cfg:?} {cfg:#?}");
        for secret in [
            "hatch_api_key_value_123",
            "snapshot-secret-value",
            "old-secret-value",
            "s3-secret-value",
            "db-password",
            "cluster-secret-value",
        ] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
        assert!(shown.contains("<redacted>") && shown.contains("GK123"));
    }
}
