//! The core of the daemon: VMs and their lifecycle. The API calls into this;
//! it owns the database records, the per-VM supervisors and the QEMU machines.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use hatch_vmm::Accel;
use tokio_util::task::TaskTracker;

use crate::cluster::hop::HopKey;
use crate::cluster::peers::Peers;
use crate::config::Config;
use crate::error::ApiError;
use crate::fault::Faults;
use crate::images::Images;
use crate::metrics::Metrics;
use crate::model::{self, CreateVm, Vm, VmState};
use crate::routes::RouteTable;
use crate::snapshot::seal::SealKeys;
use crate::snapshot::uploads::Uploads;
use crate::state::StateStore;
use crate::supervisor::VmSupervisor;

pub struct VmManager {
    pub(crate) store: Arc<dyn StateStore>,
    pub(crate) images: Images,
    pub(crate) cfg: Arc<Config>,
    pub(crate) accel: Accel,
    pub(crate) tsc_khz: Option<u64>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) routes: RouteTable,
    supervisors: Mutex<HashMap<String, Arc<VmSupervisor>>>,
    /// Background operations (boots, stops) that shutdown waits for.
    pub(crate) tasks: TaskTracker,
    /// Snapshot storage (S3); None when not configured.
    pub(crate) storage: Option<Arc<hatch_chunks::ChunkStore>>,
    /// `qemu-system-x86_64 --version`, recorded in snapshot manifests.
    pub(crate) qemu_version: String,
    /// Uploads hold it shared, chunk garbage collection exclusively.
    pub(crate) gc_lock: tokio::sync::RwLock<()>,
    /// Seals manifests and local copy descriptions.
    pub(crate) seal_keys: SealKeys,
    /// Test-only fault injection (empty in production).
    pub(crate) faults: Faults,
    /// The storage worker's state.
    pub(crate) uploads: Uploads,
    /// Who holds this daemon's bucket locks (for people reading them).
    pub(crate) owner: String,
    /// When the route table was last read from the store (cluster mode).
    pub(crate) routes_read_at: Mutex<Option<std::time::Instant>>,
    /// QEMU `-cpu` model of the VMs this node launches.
    pub(crate) cpu_model: String,
    /// This host's CPU (for snapshots taken under `-cpu host`).
    pub(crate) cpu_signature: String,
    /// This node's right to run its VMs (self-fencing, cluster mode).
    pub(crate) lease: crate::cluster::lease::Lease,
    /// Which node owns another node's VM (for forwarding).
    pub(crate) peers: Peers,
    /// Signs and checks requests between nodes; None without
    /// `HATCH_CLUSTER_SECRET`.
    pub(crate) hop: Option<HopKey>,
    /// Local snapshot copies evicted since start.
    pub(crate) evictions: AtomicU64,
    /// Local snapshot copies a restore is reading (count per snapshot id).
    pub(crate) copies_in_use: Mutex<HashMap<String, usize>>,
    /// VMs' outbound network (tap devices, firewall).
    pub(crate) network: crate::network::Network,
    /// Which suspended VMs hold a standby QEMU, oldest first.
    pub(crate) standbys: crate::snapshot::standby::StandbyPool,
}

/// Files of one VM.
pub struct VmPaths {
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub console_log: PathBuf,
    pub mem: PathBuf,
    pub qmp_socket: PathBuf,
    pub agent_socket: PathBuf,
    pub pid_file: PathBuf,
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

pub use hatch_snapshot::names::new_id;

impl VmManager {
    pub async fn new(
        cfg: Arc<Config>,
        store: Arc<dyn StateStore>,
        images: Images,
        metrics: Arc<Metrics>,
        storage: Option<Arc<hatch_chunks::ChunkStore>>,
        seal_keys: SealKeys,
    ) -> anyhow::Result<Arc<VmManager>> {
        let faults = Faults::parse(&cfg.faults).map_err(anyhow::Error::msg)?;
        if !faults.is_empty() {
            tracing::warn!(faults = %cfg.faults, "fault injection is on (tests only)");
        }
        let qemu_version = std::process::Command::new(&cfg.qemu_binary)
            .arg("--version")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().map(str::to_string))
            .unwrap_or_default();
        let accel = cfg.accel.resolve();
        let routes = RouteTable::load(store.as_ref()).await?;
        let peers = Peers::new(store.clone(), &cfg.node_name, cfg.node_down_after);
        let hop = cfg
            .cluster_secret
            .as_ref()
            .map(|s| HopKey::new(s, &cfg.node_name));
        let network = crate::network::Network::setup(cfg.network, &cfg.data_dir)?;
        let standbys = crate::snapshot::standby::StandbyPool::new(metrics.standby_qemus.clone());
        Ok(Arc::new(VmManager {
            network,
            store,
            images,
            accel,
            tsc_khz: hatch_vmm::host::tsc_khz(),
            metrics,
            routes,
            supervisors: Mutex::default(),
            tasks: TaskTracker::new(),
            storage,
            qemu_version,
            gc_lock: tokio::sync::RwLock::new(()),
            seal_keys,
            faults,
            uploads: Uploads::default(),
            owner: format!("{} pid {}", cfg.data_dir.display(), std::process::id()),
            routes_read_at: Mutex::default(),
            lease: Default::default(),
            cpu_model: cfg
                .cpu_model
                .clone()
                .unwrap_or_else(|| hatch_vmm::spec::default_cpu_model(accel).to_string()),
            cpu_signature: hatch_vmm::host::cpu_signature(),
            peers,
            hop,
            evictions: AtomicU64::new(0),
            copies_in_use: Mutex::default(),
            standbys,
            cfg,
        }))
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    pub fn paths(&self, id: &str) -> VmPaths {
        let dir = self.cfg.data_dir.join("vms").join(id);
        let run = &self.cfg.run_dir;
        VmPaths {
            disk: dir.join("disk.qcow2"),
            console_log: dir.join("console.log"),
            // Guest RAM is a shared file next to the disk, on the same file
            // system as the snapshots: a suspend keeps it and a wake takes it
            // back by renaming, no copy (docs/ARCHITECTURE.md, "Memory").
            mem: dir.join("mem"),
            // Sockets and pid file live in the run dir: a short path for
            // the unix sockets whatever the data dir's length.
            qmp_socket: run.join(format!("{id}.qmp")),
            agent_socket: run.join(format!("{id}.agent")),
            pid_file: run.join(format!("{id}.pid")),
            dir,
        }
    }

    pub(crate) fn supervisor(&self, id: &str) -> Result<Arc<VmSupervisor>, ApiError> {
        self.supervisors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::not_found("vm", id))
    }

    /// Not found unless the VM exists (here or on another node).
    pub(crate) async fn known_vm(&self, id: &str) -> Result<(), ApiError> {
        if self.supervisor(id).is_ok() || self.store.get_vm(id).await?.is_some() {
            return Ok(());
        }
        Err(ApiError::not_found("vm", id))
    }

    /// This node runs (or manages) the VM.
    pub fn runs_here(&self, id: &str) -> bool {
        self.supervisor(id).is_ok()
    }

    /// The VM's runtime, made with `make` if there is none yet (two
    /// callers racing to take charge of a VM share one runtime, and so one
    /// wake).
    pub(crate) fn supervisor_or_insert(
        &self,
        id: &str,
        make: impl FnOnce() -> Arc<VmSupervisor>,
    ) -> Arc<VmSupervisor> {
        self.supervisors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_insert_with(make)
            .clone()
    }

    pub(crate) fn insert_supervisor(&self, rt: Arc<VmSupervisor>) {
        self.supervisors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rt.id.clone(), rt);
    }

    fn remove_supervisor(&self, id: &str) {
        self.supervisors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Let go of a VM this node no longer runs (another node took it over):
    /// its runtime and run-dir files go, its record is not touched.
    pub(crate) fn forget_supervisor(&self, id: &str) {
        let rt = self.supervisor(id);
        // Removed first: a standby being started sees it and ends itself.
        self.remove_supervisor(id);
        if let Ok(rt) = rt {
            self.standbys.forget(id);
            tokio::spawn(async move {
                let standby = rt.standby.lock().await.take();
                if let Some(standby) = standby {
                    standby.discard().await;
                }
            });
        }
        self.remove_runtime_files(id);
    }

    pub(crate) fn all_supervisors(&self) -> Vec<Arc<VmSupervisor>> {
        self.supervisors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn states(&self) -> Vec<VmState> {
        self.supervisors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|rt| rt.state())
            .collect()
    }

    /// Move a VM to `to`, in memory and in the database, if the lifecycle allows it.
    pub(crate) async fn transition(
        &self,
        rt: &VmSupervisor,
        to: VmState,
        reason: Option<String>,
    ) -> Result<(), ApiError> {
        if to == VmState::Running {
            // A VM that starts running gets a full idle timeout. Touched
            // before `inner` is taken: the lock order is activity, then inner.
            rt.activity.touch();
        }
        let _serial = rt.transitions.lock().await;
        let from = rt.state();
        if from != to && !from.can_become(to) {
            return Err(ApiError::conflict(format!(
                "vm '{}' is {from} and cannot become {to}",
                rt.id
            )));
        }
        // Stored first: a state the store refused is never shown.
        if self.fenced() {
            return Err(ApiError::StateStoreUnavailable);
        }
        if !self
            .store
            .set_vm_state(&rt.id, to, reason.as_deref(), &self.cfg.node_name)
            .await?
        {
            // Another node owns it now: whatever runs here must not.
            let machine = rt.lock().machine.take();
            if let Some(machine) = machine {
                machine.kill();
            }
            self.forget_supervisor(&rt.id);
            tracing::warn!(vm = %rt.id, "a vm this node ran was taken over: its process was ended");
            return Err(ApiError::conflict(format!(
                "vm '{}' was taken over by another node; this node no longer runs it",
                rt.id
            )));
        }
        let mut inner = rt.lock();
        match (from, to) {
            // A cold boot is ready once its app answers (the boot probe).
            (VmState::Starting, VmState::Running) => inner.ready = false,
            // A restored guest resumes an app that answered.
            (VmState::Restoring, VmState::Running) => inner.ready = true,
            // A checkpoint leaves it as it was.
            _ => {}
        }
        rt.publish_state(&mut inner, to);
        match &reason {
            Some(r) => tracing::info!(vm = %rt.id, %from, %to, reason = %r, "vm state"),
            None => tracing::info!(vm = %rt.id, %from, %to, "vm state"),
        }
        Ok(())
    }

    pub async fn get(&self, id: &str) -> Result<Vm, ApiError> {
        let vm = self
            .store
            .get_vm(id)
            .await?
            .ok_or_else(|| ApiError::not_found("vm", id))?
            .vm;
        Ok(self.present(vm))
    }

    pub async fn list(&self) -> Result<Vec<Vm>, ApiError> {
        Ok(self
            .store
            .list_vms()
            .await?
            .into_iter()
            .map(|r| self.present(r.vm))
            .collect())
    }

    /// A VM record with what lives in memory: readiness and idle timeout.
    fn present(&self, mut vm: Vm) -> Vm {
        vm.ready = self.supervisor(&vm.id).is_ok_and(|rt| rt.is_ready());
        if let Some((secs, host)) = self.routes.idle_setting_of(&vm.id) {
            vm.idle_timeout_seconds = Some(secs);
            vm.idle_timeout_route = Some(host);
        }
        vm
    }

    /// The id of the VM with this id or name (unambiguous: a name never
    /// looks like an id, unless it is its own VM's id).
    pub async fn resolve(&self, id_or_name: &str) -> Result<String, ApiError> {
        if self.supervisor(id_or_name).is_ok() {
            return Ok(id_or_name.to_string());
        }
        if let Some(id) = self.store.vm_id_by_name(id_or_name).await? {
            return Ok(id);
        }
        // A VM of another node has no runtime here.
        match self.store.get_vm(id_or_name).await? {
            Some(rec) => Ok(rec.vm.id),
            None => Err(ApiError::not_found("vm", id_or_name)),
        }
    }

    /// Like [`resolve`](Self::resolve), for calls that act on the VM: those
    /// are refused (409) for a VM that another node runs.
    pub async fn resolve_local(&self, id_or_name: &str) -> Result<String, ApiError> {
        if self.supervisor(id_or_name).is_ok() {
            return Ok(id_or_name.to_string());
        }
        let id = self.resolve(id_or_name).await?;
        if self.attach_handed_over(&id).await?.is_some() {
            return Ok(id);
        }
        let node = self
            .store
            .get_vm(&id)
            .await?
            .and_then(|r| r.vm.node)
            .unwrap_or_default();
        Err(ApiError::conflict(format!(
            "vm '{id_or_name}' belongs to node '{node}' (this is '{}'): send this call to that node's API",
            self.cfg.node_name
        )))
    }

    /// Every node of the cluster (this one alone without a shared database).
    pub async fn nodes(&self) -> Result<Vec<model::Node>, ApiError> {
        Ok(crate::cluster::nodes::list(self.store.as_ref(), self.cfg.node_down_after).await?)
    }

    /// Validate, create the VM's disk and record, and start booting it
    /// (or, with `from_snapshot`, restoring it from that snapshot).
    pub async fn create(self: &Arc<Self>, req: CreateVm) -> Result<Vm, ApiError> {
        if let Some(sid) = req.from_snapshot.clone() {
            return self.fork(req, &sid).await;
        }
        let image_name = req.image.unwrap_or_else(|| "default".to_string());
        let image = self.image(&image_name).await?;
        let settings = model::VmSettings {
            env: req.env.unwrap_or_default(),
            cmd: req.cmd,
            restart: req.restart,
            network: Some(self.network.settings_for(req.egress)?),
        };
        if settings.has_app_settings() && image.app.is_none() {
            return Err(ApiError::invalid(format!(
                "env, cmd and restart are for imported container images; image '{}' is not one",
                image.name
            )));
        }
        settings.validate()?;
        let vcpus = req.vcpus.unwrap_or(model::DEFAULT_VCPUS);
        let max_vcpus = hatch_vmm::host::cpu_count();
        if vcpus == 0 || vcpus > max_vcpus {
            return Err(ApiError::invalid(format!(
                "vcpus must be between 1 and {max_vcpus} (this host's CPUs), got {vcpus}"
            )));
        }
        let memory_mib = req.memory_mib.unwrap_or(model::DEFAULT_MEMORY_MIB);
        let max_mem = hatch_vmm::host::memory_mib()
            .unwrap_or(0)
            .saturating_sub(1024)
            .max(model::MIN_MEMORY_MIB);
        if !(model::MIN_MEMORY_MIB..=max_mem).contains(&memory_mib) {
            return Err(ApiError::invalid(format!(
                "memory_mib must be between {} and {max_mem} (host memory less 1 GiB), got {memory_mib}",
                model::MIN_MEMORY_MIB,
            )));
        }
        let disk_mib = req.disk_mib.unwrap_or(image.disk_mib);
        if !(image.disk_mib..=model::MAX_DISK_MIB).contains(&disk_mib) {
            return Err(ApiError::invalid(format!(
                "disk_mib must be between {} (the size of image '{}') and {}, got {disk_mib}",
                image.disk_mib,
                image.name,
                model::MAX_DISK_MIB
            )));
        }
        let id = new_id("vm");
        let name = self.free_name(req.name, &id).await?;

        let paths = self.paths(&id);
        std::fs::create_dir_all(&paths.dir)
            .with_context(|| format!("creating {}", paths.dir.display()))?;
        if let Err(e) =
            hatch_vmm::disk::create_overlay(&image.disk, &image.disk_format, &paths.disk, disk_mib)
                .await
        {
            let _ = std::fs::remove_dir_all(&paths.dir);
            return Err(ApiError::Internal(
                anyhow::Error::new(e).context("creating the VM's disk"),
            ));
        }
        let vm = Vm {
            vcpus,
            memory_mib,
            disk_mib,
            settings,
            ..Vm::fresh(
                id.clone(),
                name,
                VmState::Starting,
                image.name.clone(),
                now_rfc3339(),
            )
        };
        if let Err(e) = self.insert_vm(&vm).await {
            let _ = std::fs::remove_dir_all(&paths.dir);
            return Err(e);
        }
        let rt = VmSupervisor::new(id.clone(), VmState::Starting, Vec::new());
        let guard = rt.try_begin("boot").await?;
        self.insert_supervisor(rt.clone());
        tracing::info!(vm = %id, name = %vm.name, image = %vm.image, vcpus, memory_mib, "vm created");
        let this = self.clone();
        self.tasks.spawn(async move { this.boot(rt, guard).await });
        Ok(vm)
    }

    /// The name a new VM gets: the one asked for, if valid and free, else its id.
    pub(crate) async fn free_name(
        &self,
        name: Option<String>,
        id: &str,
    ) -> Result<String, ApiError> {
        let Some(name) = name else {
            return Ok(id.to_string());
        };
        model::validate_vm_name(&name)?;
        if self.store.vm_name_taken(&name).await? {
            return Err(ApiError::conflict(format!(
                "a vm named '{name}' already exists"
            )));
        }
        Ok(name)
    }

    /// Record a new VM with the default retention policy.
    pub(crate) async fn insert_vm(&self, vm: &Vm) -> Result<(), ApiError> {
        let vm = &Vm {
            node: Some(self.cfg.node_name.clone()),
            ..vm.clone()
        };
        if let Err(e) = self.store.insert_vm(vm).await {
            // Two creates racing for one name: the UNIQUE constraint decides.
            if self.store.vm_name_taken(&vm.name).await.unwrap_or(false) {
                return Err(ApiError::conflict(format!(
                    "a vm named '{}' already exists",
                    vm.name
                )));
            }
            return Err(e.into());
        }
        let policy = model::Retention {
            keep_last: Some(model::DEFAULT_KEEP_LAST),
            max_age_seconds: None,
        };
        self.store.set_retention(&vm.id, &policy).await?;
        Ok(())
    }

    /// Boot a stopped or failed VM; wake a suspended one (restore from its
    /// newest snapshot, as `POST /restore` does).
    pub async fn start(self: &Arc<Self>, id: &str) -> Result<Vm, ApiError> {
        let rt = self.supervisor(id)?;
        if rt.state() == VmState::Snapshotted {
            return self.restore(id, model::RestoreRequest::default()).await;
        }
        let guard = rt.try_begin("start").await?;
        let state = rt.state();
        if !matches!(state, VmState::Stopped | VmState::Failed) {
            return Err(ApiError::conflict(format!(
                "vm '{id}' is {state}; a running vm needs no start (stop it first to reboot it)"
            )));
        }
        self.transition(&rt, VmState::Starting, None).await?;
        let this = self.clone();
        self.tasks.spawn(async move { this.boot(rt, guard).await });
        self.get(id).await
    }

    /// Stop a running VM: QEMU exits (its disk flushed) and its memory is freed.
    pub async fn stop(self: &Arc<Self>, id: &str) -> Result<Vm, ApiError> {
        let rt = self.supervisor(id)?;
        let guard = rt.try_begin("stop").await?;
        let state = rt.state();
        if state == VmState::Snapshotted {
            // Its memory state is discarded (the snapshots stay, and its
            // disk); the next start boots from the disk.
            self.transition(&rt, VmState::Stopped, Some("stopped while suspended: the next start boots from its disk; its snapshots can still be restored".into())).await?;
            self.discard_standby(&rt).await;
            return self.get(id).await;
        }
        if state != VmState::Running {
            return Err(ApiError::conflict(format!(
                "vm '{id}' is {state}; only a running or suspended vm can be stopped"
            )));
        }
        self.transition(&rt, VmState::Stopping, None).await?;
        let this = self.clone();
        self.tasks.spawn(async move {
            let _guard = guard;
            this.halt(&rt).await;
            if let Err(e) = this.transition(&rt, VmState::Stopped, None).await {
                tracing::error!(vm = %rt.id, error = %e, "recording stop failed");
            }
        });
        self.get(id).await
    }

    /// Delete a VM, its routes, disk and logs. A running VM is stopped first.
    pub async fn delete(self: &Arc<Self>, id: &str) -> Result<(), ApiError> {
        let rt = self.supervisor(id)?;
        let _guard = rt.try_begin("delete").await?;
        if rt.state().has_process() {
            // So that the exit watcher does not record the quit as a failure.
            self.transition(&rt, VmState::Stopping, None).await?;
        }
        self.halt(&rt).await;
        let snapshots = self.store.list_snapshots(id).await?;
        // No upload may write a manifest after the VM is gone.
        let ids: Vec<String> = snapshots.iter().map(|s| s.snap.id.clone()).collect();
        self.cancel_uploads(&ids).await;
        // The manifests' deletion is queued with the records' (their chunks
        // become garbage for the collector to free).
        let manifests: Vec<String> = ids
            .iter()
            .map(|sid| crate::snapshot::manifest::manifest_key(id, sid))
            .collect();
        let hostnames = self.store.delete_vm(id, &manifests, &now_rfc3339()).await?;
        // Local cleanup first, with no await in between: a caller that
        // hangs up cannot leave it half done.
        for sid in &ids {
            let _ = std::fs::remove_dir_all(self.snapshot_dir(sid));
        }
        for h in hostnames {
            self.routes.remove(&h);
        }
        self.remove_supervisor(id);
        // One started since `halt` (an upload that ended meanwhile) ends
        // here or sees the supervisor gone and ends itself.
        self.discard_standby(&rt).await;
        self.metrics.forget_vm(id);
        self.network.forget(id);
        let paths = self.paths(id);
        if let Err(e) = std::fs::remove_dir_all(&paths.dir) {
            tracing::warn!(vm = %id, error = %e, "could not remove vm directory");
        }
        tracing::info!(vm = %id, "vm deleted");
        if let Some(store) = &self.storage {
            for sid in &ids {
                self.delete_manifest(store, id, sid).await;
            }
        }
        Ok(())
    }

    /// Make sure QEMU is gone: ask it to quit, kill it after the stop timeout,
    /// and free the VM's memory and runtime files.
    pub(crate) async fn halt(&self, rt: &VmSupervisor) {
        self.discard_standby(rt).await;
        let machine = rt.machine();
        if let Some(machine) = machine {
            match tokio::time::timeout(self.cfg.stop_timeout, machine.quit()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(vm = %rt.id, error = %e, "quit failed; killing QEMU");
                    machine.kill();
                    machine.wait_exit().await;
                }
                Err(_) => {
                    tracing::warn!(vm = %rt.id, "QEMU did not quit in time; killing it");
                    machine.kill();
                    machine.wait_exit().await;
                }
            }
        }
        {
            let mut inner = rt.lock();
            inner.machine = None;
            inner.agent = None;
        }
        self.clear_forwards(rt).await;
        if let Err(e) = self.end_lazy_ram(&rt.id).await {
            tracing::warn!(vm = %rt.id, error = format!("{e:#}"), "ending the lazy RAM server failed");
        }
        self.remove_runtime_files(&rt.id);
    }

    /// Forget a VM's port forwards (its QEMU is gone; the ports are free).
    pub(crate) async fn clear_forwards(&self, rt: &VmSupervisor) {
        rt.lock().forwards.clear();
        if let Err(e) = self
            .store
            .set_vm_forwards(&rt.id, &[], &self.cfg.node_name)
            .await
        {
            tracing::warn!(vm = %rt.id, error = %e, "clearing forwards failed");
        }
    }

    pub(crate) fn remove_runtime_files(&self, id: &str) {
        let p = self.paths(id);
        self.remove_lazy_files(id);
        for f in [&p.mem, &p.qmp_socket, &p.agent_socket, &p.pid_file] {
            if let Err(e) = std::fs::remove_file(f)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(vm = %id, file = %f.display(), error = %e, "could not remove");
            }
        }
    }

    /// The console log from byte `offset` on (at most 1 MiB), and the offset after it.
    pub fn logs(&self, id: &str, offset: u64) -> Result<(Vec<u8>, u64), ApiError> {
        use std::io::{Read, Seek, SeekFrom};
        self.supervisor(id)?;
        let path = self.paths(id).console_log;
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
            Err(e) => return Err(anyhow::Error::new(e).context("opening console log").into()),
        };
        let len = file.metadata().context("console log")?.len();
        let start = offset.min(len);
        file.seek(SeekFrom::Start(start)).context("console log")?;
        let mut buf = Vec::new();
        file.take(1 << 20)
            .read_to_end(&mut buf)
            .context("reading console log")?;
        let next = start + buf.len() as u64;
        Ok((buf, next))
    }

    /// Wait for in-flight operations to finish (bounded by the caller).
    pub async fn drain(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}
