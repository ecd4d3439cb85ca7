//! Daemon configuration: one struct with named defaults. The CLI fills it from
//! flags, environment variables (`HATCH_*`) and an optional TOML file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use hatch_vmm::AccelChoice;

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
    /// API key from the environment; when set its hash is added to the key ring.
    pub api_key: Option<String>,
    /// S3 settings; snapshots need them.
    pub s3: Option<S3Config>,
    /// Unreferenced chunks younger than this are kept by garbage collection.
    pub gc_grace: Duration,
    /// How long a proxied request waits for its VM to wake before 503.
    pub wake_timeout: Duration,
    /// Requests held per VM while it wakes; more get 503 at once.
    pub wake_queue: usize,
    /// A disk chain longer than this is flattened after a restore.
    pub max_disk_layers: usize,
}

#[derive(Clone)]
pub struct S3Config {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for S3Config {
    // Secrets never reach logs, not even through Debug.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
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
            gc_grace: Duration::from_secs(3600),
            wake_timeout: Duration::from_secs(30),
            wake_queue: 4096,
            max_disk_layers: 8,
        }
    }
}

/// `/dev/shm/hatch-<hash of the data dir>`: one per daemon, stable across restarts.
pub fn default_run_dir(data_dir: &std::path::Path) -> PathBuf {
    let canonical = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let hash = blake3::hash(canonical.as_os_str().as_encoded_bytes()).to_hex();
    PathBuf::from("/dev/shm").join(format!("hatch-{}", &hash[..12]))
}
