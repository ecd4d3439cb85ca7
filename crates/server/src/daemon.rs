//! The composition root: config -> state store, keys, images, VM manager ->
//! re-attach to running VMs -> API and proxy servers, sharing one shutdown
//! signal. VMs keep running when the daemon stops.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{AppState, router};
use crate::auth::{self, KeyRing};
use crate::cluster::nodes::{self, NodeIdentity};
use crate::config::Config;
use crate::images::Images;
use crate::manager::VmManager;
use crate::metrics::Metrics;
use crate::resolver::VmResolver;
use crate::snapshot::seal::SealKeys;
use crate::state;

/// How long shutdown waits for in-flight VM operations.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// The daemon's sockets, bound by the caller (so that tests and embedders
/// can bind port 0 and know the address before the daemon runs).
pub struct Listeners {
    pub api: TcpListener,
    pub proxy: TcpListener,
    /// Node-to-node hops; only with `--cluster-addr`.
    pub cluster: Option<TcpListener>,
}

impl Listeners {
    /// Bind the addresses `cfg` names.
    pub async fn bind(cfg: &Config) -> anyhow::Result<Listeners> {
        let api = TcpListener::bind(cfg.api_addr)
            .await
            .with_context(|| format!("binding API address {}", cfg.api_addr))?;
        let proxy = TcpListener::bind(cfg.proxy_addr)
            .await
            .with_context(|| format!("binding proxy address {}", cfg.proxy_addr))?;
        let cluster = match cfg.cluster_addr {
            Some(addr) => {
                anyhow::ensure!(
                    cfg.cluster_secret.is_some(),
                    "--cluster-addr needs HATCH_CLUSTER_SECRET (the same on every node)"
                );
                Some(
                    TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("binding cluster address {addr}"))?,
                )
            }
            None => None,
        };
        Ok(Listeners {
            api,
            proxy,
            cluster,
        })
    }
}

/// Run the daemon on `listeners` until `shutdown` is cancelled.
pub async fn run(
    cfg: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    let _lock = lock_data_dir(&cfg.data_dir)?;
    std::fs::create_dir_all(&cfg.run_dir)
        .with_context(|| format!("creating run dir {}", cfg.run_dir.display()))?;
    let store = state::open(cfg.database_url.as_ref().map(|u| u.expose()), &cfg.data_dir)
        .await
        .context("opening the state store")?;
    let cluster_addr = match &listeners.cluster {
        Some(l) => Some(l.local_addr().context("reading the cluster address")?),
        None => None,
    };
    let me = NodeIdentity::from_config(&cfg, cluster_addr);
    nodes::register(store.as_ref(), &me)
        .await
        .context("registering this node")?;
    tracing::info!(backend = store.backend(), node = %me.name, "state store open");
    let shared = cfg.database_url.is_some();
    let (keys, generated) = KeyRing::open(store.clone(), cfg.api_key.as_ref(), shared)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(key) = generated {
        // Printed, not logged: shown once to the operator, never in log files.
        println!("Generated API key (shown only once; set HATCH_API_KEY to use it):\n{key}");
    }
    let images = hatch_image::ImageStore::open(&cfg.images_dir)
        .with_context(|| format!("opening images dir {}", cfg.images_dir.display()))?;
    let cache = cfg
        .image_cache_dir
        .as_ref()
        .filter(|d| d.is_dir() && **d != cfg.images_dir)
        .and_then(|d| hatch_image::ImageStore::open(d).ok());
    let images = Images::new(images, cache);
    let seal_keys = snapshot_seal_keys(&cfg)?;
    let metrics = Arc::new(Metrics::new());
    let cfg = Arc::new(cfg);
    let storage = match &cfg.s3 {
        Some(s3) => {
            let store = hatch_chunks::s3::connect(&hatch_chunks::s3::S3Settings {
                endpoint: s3.endpoint.clone(),
                bucket: s3.bucket.clone(),
                region: s3.region.clone(),
                access_key_id: s3.access_key_id.clone(),
                secret_access_key: s3.secret_access_key.expose().to_string(),
            })
            .context("configuring S3")?;
            tracing::info!(endpoint = %s3.endpoint, bucket = %s3.bucket, "snapshot storage: S3");
            Some(Arc::new(hatch_chunks::ChunkStore::new(store, "")))
        }
        None => {
            tracing::warn!("no S3 configured: snapshots are unavailable");
            None
        }
    };
    let vms = VmManager::new(
        cfg.clone(),
        store,
        images,
        metrics.clone(),
        storage,
        seal_keys,
    )
    .await?;
    tracing::info!(accel = %vms.accel(), data_dir = %cfg.data_dir.display(), run_dir = %cfg.run_dir.display(), "hatch starting");
    // Heartbeats (and, in a cluster, the lease) from before recovery: a
    // slow recovery must neither make this node look lost nor let it run
    // VMs without a lease.
    tokio::spawn(vms.clone().membership_worker(me, shutdown.clone()));
    remove_stale_ram_copies(&cfg.run_dir);
    vms.recover().await.context("re-attaching to VMs")?;
    vms.recover_snapshots()
        .await
        .context("recovering interrupted snapshots")?;
    vms.sweep_leftovers().await;
    vms.prune_images().await;
    // After the sweep, which removes disk layers made ahead of wakes.
    vms.stand_by_after_start().await;

    let Listeners {
        api: api_listener,
        proxy: proxy_listener,
        cluster: cluster_listener,
    } = listeners;
    let api_addr = api_listener.local_addr()?;
    tracing::info!(api = %api_addr, proxy = %proxy_listener.local_addr()?, cluster = ?cluster_addr, "listening");

    let state = Arc::new(AppState {
        vms: vms.clone(),
        keys,
        metrics: metrics.clone(),
    });
    if shared {
        tokio::spawn(reload_keys(state.clone(), shutdown.clone()));
    }
    let app = router(state);
    tokio::spawn(vms.clone().retention_worker(shutdown.clone()));
    tokio::spawn(vms.clone().idle_worker(shutdown.clone()));
    tokio::spawn(vms.clone().storage_worker(shutdown.clone()));
    let api_shutdown = shutdown.clone();
    let api = tokio::spawn(async move {
        axum::serve(api_listener, app)
            .with_graceful_shutdown(api_shutdown.cancelled_owned())
            .await
    });
    let proxy = tokio::spawn(hatch_proxy::serve(
        proxy_listener,
        Arc::new(VmResolver {
            vms: vms.clone(),
            hop_only: false,
            api_addr,
        }),
        metrics.proxy.clone(),
        shutdown.clone(),
    ));
    // Requests other nodes forward here (signed hops), for VMs this node runs.
    let cluster = cluster_listener.map(|listener| {
        tokio::spawn(hatch_proxy::serve(
            listener,
            Arc::new(VmResolver {
                vms: vms.clone(),
                hop_only: true,
                api_addr,
            }),
            metrics.proxy.clone(),
            shutdown.clone(),
        ))
    });
    tokio::spawn(vms.clone().route_refresher(shutdown.clone()));
    tokio::spawn(vms.clone().takeover_worker(shutdown.clone()));

    shutdown.cancelled().await;
    tracing::info!("shutting down; VMs keep running");
    let (api, proxy) = tokio::join!(api, proxy);
    api.context("API task")?.context("API server")?;
    proxy.context("proxy task")?.context("proxy server")?;
    if let Some(cluster) = cluster {
        cluster
            .await
            .context("cluster task")?
            .context("cluster server")?;
    }
    if tokio::time::timeout(DRAIN_LIMIT, vms.drain())
        .await
        .is_err()
    {
        tracing::warn!("gave up waiting for VM operations; they resume on next start");
    }
    // Standby QEMUs wait for wakes only this daemon would give them.
    vms.discard_all_standbys().await;
    Ok(())
}

/// Keys made or revoked through other nodes take effect here within a second.
async fn reload_keys(state: Arc<AppState>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = state.keys.reload().await {
            tracing::debug!(error = %e, "re-reading API keys failed");
        }
    }
}

/// The keys snapshots are sealed with: `HATCH_SNAPSHOT_SECRET` if set (daemons
/// sharing a bucket must share it), else a secret generated on first start
/// and kept in `<data-dir>/snapshot-secret` (readable by this user only).
fn snapshot_seal_keys(cfg: &Config) -> anyhow::Result<SealKeys> {
    let previous: Vec<&[u8]> = cfg
        .previous_snapshot_secrets
        .iter()
        .map(|s| s.expose().as_bytes())
        .collect();
    if let Some(secret) = &cfg.snapshot_secret {
        anyhow::ensure!(
            secret.expose().len() >= 16,
            "HATCH_SNAPSHOT_SECRET must be at least 16 characters"
        );
        return Ok(SealKeys::new(secret.expose().as_bytes(), &previous));
    }
    let path = cfg.data_dir.join("snapshot-secret");
    let secret = match std::fs::read_to_string(&path) {
        Ok(s) if s.trim().len() >= 16 => s.trim().to_string(),
        Ok(_) => anyhow::bail!(
            "{} is too short; remove it to generate a new one",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = auth::generate_key();
            let mut opts = std::fs::OpenOptions::new();
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts
                .write(true)
                .create_new(true)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            std::io::Write::write_all(&mut f, secret.as_bytes())?;
            f.sync_all()?;
            tracing::info!(file = %path.display(),
                "generated the snapshot signing secret; daemons sharing this bucket need the same HATCH_SNAPSHOT_SECRET");
            secret
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("reading {}", path.display()))),
    };
    Ok(SealKeys::new(secret.as_bytes(), &previous))
}

/// RAM copies a checkpoint left in the run dir when the daemon died mid-way
/// (the checkpoint was not recorded; nothing refers to them).
fn remove_stale_ram_copies(run_dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "mem") {
            tracing::info!(file = %path.display(), "removing a stale checkpoint RAM copy");
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// One daemon per data dir: two would fight over the same VMs. The lock is
/// released when the returned file is dropped (or the process dies).
fn lock_data_dir(data_dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let path = data_dir.join("hatch.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another `hatch serve` is using data dir {}",
            data_dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(anyhow::Error::new(e).context(format!("locking {}", path.display())))
        }
    }
}
