//! `hatch serve`: configuration from flags, `HATCH_*` variables and a TOML
//! file (flags and variables win), then the daemon. The file is
//! `<data-dir>/config.toml` unless `--config` names another, so that a
//! restart with only `--data-dir` keeps the settings the set-up wrote.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use hatch_server::{Config, S3Config, Secret};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

#[derive(Args)]
pub struct ServeArgs {
    /// TOML file with the same settings (flags and environment win)
    /// [default: <data-dir>/config.toml, if it exists].
    #[arg(long, env = "HATCH_CONFIG")]
    config: Option<PathBuf>,
    /// Where state, disks and logs live [default: ~/.local/share/hatch].
    #[arg(long, env = "HATCH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address of the API [default: 127.0.0.1:7070].
    #[arg(long, env = "HATCH_API_ADDR")]
    api_addr: Option<SocketAddr>,
    /// Address of the HTTP proxy to the VMs [default: 127.0.0.1:8080].
    #[arg(long, env = "HATCH_PROXY_ADDR")]
    proxy_addr: Option<SocketAddr>,
    /// Guest images; default <data-dir>/images.
    #[arg(long, env = "HATCH_IMAGES_DIR")]
    images_dir: Option<PathBuf>,
    /// Guest RAM files and sockets; default /dev/shm/hatch-<hash>.
    #[arg(long, env = "HATCH_RUN_DIR")]
    run_dir: Option<PathBuf>,
    /// The QEMU program [default: qemu-system-x86_64].
    #[arg(long, env = "HATCH_QEMU")]
    qemu: Option<PathBuf>,
    /// auto (KVM where the CPU has vmx/svm, else TCG), kvm or tcg [default: auto].
    #[arg(long, env = "HATCH_ACCEL")]
    accel: Option<String>,
    /// Unreferenced chunks younger than this many seconds survive garbage
    /// collection (protects uploads of other daemons sharing the bucket)
    /// [default: 3600].
    #[arg(long, env = "HATCH_GC_GRACE_SECONDS")]
    gc_grace_seconds: Option<u64>,
    /// How long a request for a snapshotted VM waits for its wake (seconds)
    /// [default: 30].
    #[arg(long, env = "HATCH_WAKE_TIMEOUT_SECONDS")]
    wake_timeout_seconds: Option<u64>,
    /// Flatten a VM's qcow2 disk chain after a restore once it is longer
    /// [default: 8].
    #[arg(long, env = "HATCH_MAX_DISK_LAYERS")]
    max_disk_layers: Option<usize>,
    /// Longest a QMP command may take before QEMU counts as hung and is
    /// killed (seconds; default 30).
    #[arg(long, env = "HATCH_QMP_TIMEOUT_SECONDS")]
    qmp_timeout_seconds: Option<u64>,
    /// Longest a restore waits for the guest agent to confirm the clock and
    /// RNG sync, retrying meanwhile (seconds; default 20).
    #[arg(long, env = "HATCH_AGENT_SYNC_TIMEOUT_SECONDS")]
    agent_sync_timeout_seconds: Option<u64>,
    /// Longest pause between attempts of a failing upload (seconds; default 300).
    #[arg(long, env = "HATCH_UPLOAD_RETRY_MAX_SECONDS")]
    upload_retry_max_seconds: Option<u64>,
    /// Wake from S3 with memory fetched on demand (default true); false
    /// downloads all of it before the guest runs.
    #[arg(long, env = "HATCH_LAZY_MEMORY")]
    lazy_memory: Option<bool>,
    /// Longest a suspend or checkpoint of a VM woken from S3 waits for the
    /// rest of its memory to arrive before failing (seconds; default 60).
    #[arg(long, env = "HATCH_LAZY_FILL_TIMEOUT_SECONDS")]
    lazy_fill_timeout_seconds: Option<u64>,
    /// Least time between two background fetches of memory after a wake
    /// from S3 (ms; default 0, no limit): leaves bandwidth to the guest.
    #[arg(long, env = "HATCH_LAZY_FILL_PACE_MS")]
    lazy_fill_pace_ms: Option<u64>,
    /// MiB that local snapshot copies may take (default: 40% of the data
    /// dir's file system); copies already in S3 are evicted beyond it.
    #[arg(long, env = "HATCH_LOCAL_CACHE_MIB")]
    local_cache_mib: Option<u64>,
    /// Suspended VMs (the most recently suspended) that hold a QEMU for
    /// their next wake from the local copy (~16-24 MiB each, no CPU); 0
    /// turns it off [default: 8].
    #[arg(long, env = "HATCH_STANDBY_QEMUS")]
    standby_qemus: Option<usize>,
    /// A suspend keeps the VM's QEMU, paused, as its standby (a wake then
    /// only lets it run: ~6 ms instead of ~40); false starts standbys
    /// afresh once the snapshot is uploaded [default: true].
    #[arg(long, env = "HATCH_STANDBY_WARM")]
    standby_warm: Option<bool>,
    /// A second images directory, looked in after the images dir (default
    /// ~/.cache/hatch/images, where the set-up scripts build the default image).
    #[arg(long, env = "HATCH_IMAGE_CACHE_DIR")]
    image_cache_dir: Option<PathBuf>,
    /// Keep state in PostgreSQL (postgres://user:password@host:port/db);
    /// nodes of a cluster share it [default: none, SQLite in the data dir].
    #[arg(long, env = "HATCH_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// This daemon's name in a cluster [default: the host name].
    #[arg(long, env = "HATCH_NODE_NAME")]
    node_name: Option<String>,
    /// Where the other nodes of a cluster reach this one (HOST:PORT); needs
    /// HATCH_CLUSTER_SECRET [default: none, no requests from other nodes].
    #[arg(long, env = "HATCH_CLUSTER_ADDR")]
    cluster_addr: Option<SocketAddr>,
    /// Seconds without a heartbeat after which a node counts as down [default: 15].
    #[arg(long, env = "HATCH_NODE_DOWN_SECONDS")]
    node_down_seconds: Option<u64>,
    /// QEMU -cpu model for the VMs; snapshots restore only where it is the
    /// same (a cluster of KVM hosts pins one every host supports, e.g.
    /// Haswell-v4) [default: host under KVM, max under TCG].
    #[arg(long, env = "HATCH_CPU_MODEL")]
    cpu_model: Option<String>,
    /// VMs' outbound network: tap (a tap device per VM, NAT, a firewall
    /// refusing the host and other VMs; needs root and nft), user (QEMU
    /// user-mode: inbound through the proxy only, no egress) or auto [default: auto: tap where the host allows it].
    #[arg(long, env = "HATCH_NETWORK")]
    network: Option<String>,
}

/// The TOML file: every field optional.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    api_addr: Option<SocketAddr>,
    proxy_addr: Option<SocketAddr>,
    images_dir: Option<PathBuf>,
    run_dir: Option<PathBuf>,
    qemu: Option<PathBuf>,
    accel: Option<String>,
    stop_timeout_seconds: Option<u64>,
    /// An API key, valid while the file holds it (like `HATCH_API_KEY`).
    api_key: Option<String>,
    snapshot_secret: Option<String>,
    /// Like `--database-url` (may hold a password).
    database_url: Option<String>,
    node_name: Option<String>,
    cluster_addr: Option<SocketAddr>,
    /// Like `HATCH_CLUSTER_SECRET`.
    cluster_secret: Option<String>,
    cpu_model: Option<String>,
    network: Option<String>,
    s3: Option<FileS3>,
}

/// The file name looked for in the data dir.
const CONFIG_FILE: &str = "config.toml";

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileS3 {
    endpoint: Option<String>,
    bucket: Option<String>,
    region: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
}

fn load_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let file: FileConfig =
        toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))?;
    let has_secrets = file.api_key.is_some()
        || file.snapshot_secret.is_some()
        || file.database_url.is_some()
        || file.cluster_secret.is_some()
        || file
            .s3
            .as_ref()
            .is_some_and(|s| s.secret_access_key.is_some());
    if has_secrets && readable_by_others(path) {
        tracing::warn!(file = %path.display(),
            "the config file holds secrets and is readable by other users: chmod 600 it");
    }
    Ok(file)
}

fn readable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
}

/// `~/.local/share/hatch`, where `scripts/up.sh` keeps its data dir.
pub fn default_data_dir() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share/hatch"))
}

fn build_config(args: ServeArgs) -> anyhow::Result<Config> {
    let file = match (&args.config, &args.data_dir) {
        (Some(p), _) => load_file(p)?,
        // The data dir's own file, when it has one.
        (None, Some(dir)) if dir.join(CONFIG_FILE).exists() => load_file(&dir.join(CONFIG_FILE))?,
        (None, None) => match default_data_dir().map(|d| d.join(CONFIG_FILE)) {
            Some(p) if p.exists() => load_file(&p)?,
            _ => FileConfig::default(),
        },
        (None, Some(_)) => FileConfig::default(),
    };
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .or_else(default_data_dir)
        .context("--data-dir (or HATCH_DATA_DIR) is required when HOME is not set")?;
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    let mut cfg = Config::new(data_dir);
    if let Some(a) = args.api_addr.or(file.api_addr) {
        cfg.api_addr = a;
    }
    if let Some(a) = args.proxy_addr.or(file.proxy_addr) {
        cfg.proxy_addr = a;
    }
    if let Some(d) = args.images_dir.or(file.images_dir) {
        cfg.images_dir = d;
    }
    if let Some(d) = args.run_dir.or(file.run_dir) {
        cfg.run_dir = d;
    }
    if let Some(q) = args.qemu.or(file.qemu) {
        cfg.qemu_binary = q;
    }
    if let Some(a) = args.accel.or(file.accel) {
        cfg.accel = a.parse()?;
    }
    if let Some(s) = file.stop_timeout_seconds {
        cfg.stop_timeout = Duration::from_secs(s);
    }
    if let Some(n) = args.max_disk_layers {
        cfg.max_disk_layers = n.max(1);
    }
    if let Some(w) = args.wake_timeout_seconds {
        cfg.wake_timeout = Duration::from_secs(w.max(1));
    }
    if let Some(g) = args.gc_grace_seconds {
        cfg.gc_grace = Duration::from_secs(g);
    }
    if let Some(t) = args.qmp_timeout_seconds {
        cfg.qmp_timeout = Duration::from_secs(t.max(1));
    }
    if let Some(t) = args.agent_sync_timeout_seconds {
        cfg.agent_sync_timeout = Duration::from_secs(t.max(1));
    }
    if let Some(t) = args.upload_retry_max_seconds {
        cfg.upload_retry_max = Duration::from_secs(t.max(1));
    }
    if let Some(ms) = args.lazy_fill_pace_ms {
        cfg.lazy_fill_pace = Duration::from_millis(ms);
    }
    if let Some(l) = args.lazy_memory {
        cfg.lazy_memory = l;
    }
    if let Some(n) = args.standby_qemus {
        cfg.standby_qemus = n;
    }
    if let Some(w) = args.standby_warm {
        cfg.standby_warm = w;
    }
    if let Some(t) = args.lazy_fill_timeout_seconds {
        cfg.lazy_fill_timeout = Duration::from_secs(t.max(1));
    }
    if let Some(m) = args.local_cache_mib {
        cfg.local_cache_bytes = Some(m << 20);
    }
    if let Some(d) = args.image_cache_dir {
        cfg.image_cache_dir = Some(d);
    }
    let secret_var = |name: &str| {
        std::env::var(name)
            .ok()
            .filter(|v| !v.is_empty())
            .map(Secret::new)
    };
    cfg.api_key = secret_var("HATCH_API_KEY").or(file.api_key.map(Secret::new));
    cfg.snapshot_secret =
        secret_var("HATCH_SNAPSHOT_SECRET").or(file.snapshot_secret.map(Secret::new));
    cfg.previous_snapshot_secrets = std::env::var("HATCH_SNAPSHOT_SECRET_PREVIOUS")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(Secret::new)
        .collect();
    // Test-only fault injection (see crates/server/src/fault.rs).
    cfg.faults = std::env::var("HATCH_FAULTS").unwrap_or_default();
    cfg.s3 = s3_config(file.s3.unwrap_or_default())?;
    cfg.database_url = args
        .database_url
        .filter(|u| !u.is_empty())
        .or(file.database_url)
        .map(Secret::new);
    if let Some(name) = args.node_name.or(file.node_name) {
        anyhow::ensure!(
            hatch_server::config::valid_node_name(&name),
            "invalid node name {name:?}: use 1-63 letters, digits, '.', '_' or '-'"
        );
        cfg.node_name = name;
    }
    cfg.cluster_addr = args.cluster_addr.or(file.cluster_addr);
    cfg.cluster_secret =
        secret_var("HATCH_CLUSTER_SECRET").or(file.cluster_secret.map(Secret::new));
    if let Some(model) = args.cpu_model.or(file.cpu_model) {
        anyhow::ensure!(
            hatch_vmm::spec::valid_cpu_model(&model),
            "invalid --cpu-model {model:?}: a QEMU CPU model name, optionally with ,feature settings"
        );
        cfg.cpu_model = Some(model);
    }
    if let Some(n) = args.network.or(file.network) {
        cfg.network = n.parse().map_err(anyhow::Error::msg)?;
    }
    if let Some(s) = args.node_down_seconds {
        anyhow::ensure!(s >= 2, "--node-down-seconds must be at least 2");
        cfg.node_down_after = Duration::from_secs(s);
    }
    Ok(cfg)
}

/// S3 settings from `HATCH_S3_*` variables over the file's `[s3]` table.
fn s3_config(file: FileS3) -> anyhow::Result<Option<S3Config>> {
    let var = |name: &str, from_file: Option<String>| {
        std::env::var(name)
            .ok()
            .filter(|v| !v.is_empty())
            .or(from_file)
    };
    let endpoint = var("HATCH_S3_ENDPOINT", file.endpoint);
    let bucket = var("HATCH_S3_BUCKET", file.bucket);
    let region = var("HATCH_S3_REGION", file.region);
    let key_id = var("HATCH_S3_ACCESS_KEY_ID", file.access_key_id);
    let secret = var("HATCH_S3_SECRET_ACCESS_KEY", file.secret_access_key);
    match (bucket, key_id, secret) {
        (None, None, None) => Ok(None),
        (Some(bucket), Some(access_key_id), Some(secret_access_key)) => Ok(Some(S3Config {
            endpoint: endpoint.unwrap_or_default(),
            bucket,
            region: region.unwrap_or_else(|| "us-east-1".into()),
            access_key_id,
            secret_access_key: Secret::new(secret_access_key),
        })),
        _ => anyhow::bail!(
            "incomplete S3 settings: HATCH_S3_BUCKET, HATCH_S3_ACCESS_KEY_ID and HATCH_S3_SECRET_ACCESS_KEY go together"
        ),
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HATCH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cfg = build_config(args)?;
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signal.cancel();
    });
    // Bound before the daemon starts: a port in use fails at once.
    let listeners = hatch_server::daemon::Listeners::bind(&cfg).await?;
    hatch_server::run(cfg, listeners, shutdown).await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
