//! Launching a VM's QEMU, watching it until it exits, measuring its boot, and
//! re-attaching to VMs that kept running while the daemon was down.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hatch_vmm::{Exit, Machine, MachineSpec, PortForward, VmmError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::manager::{VmManager, now_rfc3339};
use crate::model::{self, VmState};
use crate::network::Link;
use crate::supervisor::{OpGuard, Standby, VmSupervisor};

/// A launch's QEMU, and whether it is a warm standby: the VM's state is
/// then already in it, paused (`cont` runs it).
pub(crate) struct Launched {
    pub machine: Arc<Machine>,
    pub warm: bool,
}

/// Launch attempts: a freshly picked free port can be taken by someone else
/// before QEMU binds it; a new pick then succeeds.
const LAUNCH_ATTEMPTS: usize = 3;
/// How long the boot-time probe waits for the guest's first HTTP answer.
const PROBE_LIMIT: Duration = Duration::from_secs(180);

impl VmManager {
    /// The boot operation: launch QEMU and record the outcome.
    pub(crate) async fn boot(self: Arc<Self>, rt: Arc<VmSupervisor>, guard: OpGuard) {
        let started = Instant::now();
        match self.launch(&rt, false, None).await {
            Ok(Launched { machine, .. }) => {
                // The start time first: whoever sees the VM running sees
                // when it started.
                if let Err(e) = self.store.set_vm_started(&rt.id, &now_rfc3339()).await {
                    tracing::error!(vm = %rt.id, error = %e, "recording start time failed");
                }
                if let Err(e) = self.transition(&rt, VmState::Running, None).await {
                    tracing::error!(vm = %rt.id, error = %e, "recording boot failed");
                }
                tracing::info!(vm = %rt.id, pid = machine.pid(), launch_ms = started.elapsed().as_millis() as u64, "qemu launched");
                self.watch(rt.clone(), machine.clone());
                // Hold the agent channel open so the guest agent can block
                // on it (it polls while no host is connected).
                if let Ok(agent) =
                    hatch_vmm::agent::Agent::connect(&self.paths(&rt.id).agent_socket).await
                {
                    rt.lock().agent = Some(agent);
                }
                drop(guard);
                // Not a tracked operation: shutdown need not wait for a guest
                // that may never answer HTTP (custom images).
                let this = self.clone();
                tokio::spawn(async move { this.measure_boot(rt, started).await });
            }
            Err(e) => {
                let reason = format!("boot failed: {e:#}");
                tracing::error!(vm = %rt.id, %reason);
                self.clear_forwards(&rt).await;
                self.remove_runtime_files(&rt.id);
                if let Err(e) = self.transition(&rt, VmState::Failed, Some(reason)).await {
                    tracing::error!(vm = %rt.id, error = %e, "recording failure failed");
                }
            }
        }
    }

    /// Launch QEMU for the VM. `restore`: RAM file and console log are kept
    /// and QEMU waits for its CPU and device state (`-incoming defer`).
    /// `ram`: the file to map as guest RAM instead of the VM's RAM file (a
    /// lazily served one). A standby QEMU of the VM that fits is taken,
    /// else it is ended first.
    pub(crate) async fn launch(
        &self,
        rt: &VmSupervisor,
        restore: bool,
        ram: Option<&std::path::Path>,
    ) -> anyhow::Result<Launched> {
        let standby = rt.standby.lock().await.take();
        self.launch_or_take(rt, restore, ram, standby).await
    }

    /// [`VmManager::launch`], taking `standby` (a QEMU started ahead of this
    /// wake, taken from the VM's slot by the caller) instead when it is
    /// exactly the QEMU this launch would start and still waits for its
    /// state; else it is ended before anything else starts, and on any
    /// failure (no QEMU of the VM is left behind unwatched).
    pub(crate) async fn launch_or_take(
        &self,
        rt: &VmSupervisor,
        restore: bool,
        ram: Option<&std::path::Path>,
        mut standby: Option<Standby>,
    ) -> anyhow::Result<Launched> {
        if standby.is_some() {
            self.standbys.forget(&rt.id);
        }
        let launched = self.launch_into(rt, restore, ram, &mut standby).await;
        if let Some(unused) = standby {
            unused.discard().await;
        }
        launched
    }

    async fn launch_into(
        &self,
        rt: &VmSupervisor,
        restore: bool,
        ram: Option<&std::path::Path>,
        standby: &mut Option<Standby>,
    ) -> anyhow::Result<Launched> {
        // A warm standby's tap still holds the VM's last /30.
        let held = standby.as_ref().is_some_and(|s| s.warm);
        let mut plan = self.launch_plan(&rt.id, held).await?;
        let vm = &plan.vm.clone();
        let paths = self.paths(&vm.id);
        std::fs::create_dir_all(&self.cfg.run_dir)
            .with_context(|| format!("creating {}", self.cfg.run_dir.display()))?;
        if !restore {
            // A cold boot starts from zeroed RAM and a fresh console log (the
            // previous boot's log stays readable until the next boot).
            let _ = std::fs::remove_file(&paths.mem);
            let _ = std::fs::remove_file(&paths.console_log);
        }
        let mut layers = self.store.disk_layers(&vm.id).await?;
        if !restore {
            self.unfreeze_top_layer(vm, &mut layers).await?;
        }
        let top = layers.last().context("vm has no disk layer")?;
        let mem_path = ram.map_or_else(|| paths.mem.clone(), std::path::Path::to_path_buf);
        let t_prepare = std::time::Instant::now();
        if let Some(standby) = standby.take() {
            // Its host ports, if it forwards the guest ports this launch
            // would (a route to another port may have come meanwhile).
            let forwards = standby.launched.spec.forwards.clone();
            let same_ports = forwards
                .iter()
                .map(|f| f.guest)
                .eq(plan.guest_ports.iter().copied());
            let spec = plan.spec(self, top, restore, mem_path.clone(), forwards.clone());
            if restore && same_ports && standby.launched.fits(&spec) && standby.waiting().await {
                if let Err(e) = self.record_forwards(rt, &forwards).await {
                    standby.discard().await;
                    return Err(e);
                }
                let warm = standby.warm;
                tracing::debug!(vm = %vm.id, pid = standby.machine.pid(), warm, "waking into the standby QEMU");
                self.metrics.standby_wakes.inc();
                // A warm standby's tap is the one its run configured.
                let link = if warm { &None } else { &plan.link };
                let machine = self.install(
                    rt,
                    standby.machine,
                    spec,
                    link,
                    restore,
                    t_prepare,
                    t_prepare,
                )?;
                return Ok(Launched { machine, warm });
            }
            tracing::debug!(vm = %vm.id, mine = ?standby.launched.spec.args(), wanted = ?spec.args(), same_ports, "the standby QEMU does not fit this launch; ending it");
            standby.discard().await;
            if held {
                // Its tap is gone with it: the /30 is chosen as for any launch.
                plan = self.launch_plan(&rt.id, false).await?;
            }
        }
        let mut last_err = None;
        let previous = rt.lock().last_ports.clone();
        for attempt in 0..LAUNCH_ATTEMPTS {
            // The host ports of the last run while they are free (direct
            // access keeps working across restarts and wakes), else new ones.
            let forwards = pick_forwards(&plan.guest_ports, &previous, attempt == 0)?;
            let spec = plan.spec(self, top, restore, mem_path.clone(), forwards.clone());
            // Recorded before the launch: if the daemon dies right after it,
            // the next daemon re-adopts this QEMU with these ports, not with
            // ports of an earlier boot that may now belong to another VM.
            self.record_forwards(rt, &forwards).await?;
            let t_qemu = std::time::Instant::now();
            match Machine::launch(&self.cfg.qemu_binary, &spec).await {
                Ok(machine) => {
                    machine.set_command_timeout(self.cfg.qmp_timeout);
                    let machine = self.install(
                        rt,
                        Arc::new(machine),
                        spec,
                        &plan.link,
                        restore,
                        t_prepare,
                        t_qemu,
                    )?;
                    return Ok(Launched {
                        machine,
                        warm: false,
                    });
                }
                Err(VmmError::Launch(msg)) if msg.contains("forwarding") => {
                    tracing::warn!(vm = %vm.id, %msg, "port taken; retrying launch");
                    last_err = Some(VmmError::Launch(msg));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(last_err.map_or_else(|| anyhow::anyhow!("launch failed"), Into::into))
    }

    /// What every launch of the VM shares: its record and image, the guest
    /// ports to forward, its kernel parameters and its outbound link
    /// (`link_held`: its last one, which a warm standby of the VM holds).
    pub(crate) async fn launch_plan(
        &self,
        vm_id: &str,
        link_held: bool,
    ) -> anyhow::Result<LaunchPlan> {
        let rec = self
            .store
            .get_vm(vm_id)
            .await?
            .context("vm record vanished")?;
        let vm = rec.vm;
        let image = self
            .image(&vm.image)
            .await
            .with_context(|| format!("image '{}'", vm.image))?;
        let mut guest_ports: BTreeSet<u16> = self.routes.ports_of(&vm.id);
        guest_ports.insert(model::DEFAULT_GUEST_PORT);
        // An imported container image's exposed ports are reachable too.
        guest_ports.extend(
            image
                .app
                .iter()
                .flat_map(|a| a.exposed_ports.iter().copied()),
        );
        let mut extra_cmdline = Vec::new();
        if vm.disk_mib > image.disk_mib {
            extra_cmdline.push("hatch.disk_grow=1".to_string());
        }
        let link = self
            .network
            .prepare(&vm.id, vm.settings.network.as_ref(), link_held)
            .context("preparing the vm's outbound network")?;
        if let Some(link) = &link {
            extra_cmdline.extend(link.kernel_params());
        }
        if image.app.is_some() {
            // The guest's hostname is the VM's name (a DNS label).
            extra_cmdline.push(format!("hatch.hostname={}", vm.name));
            extra_cmdline.extend(vm.settings.kernel_param());
        }
        Ok(LaunchPlan {
            vm,
            image,
            guest_ports,
            extra_cmdline,
            link,
        })
    }

    async fn record_forwards(
        &self,
        rt: &VmSupervisor,
        forwards: &[PortForward],
    ) -> anyhow::Result<()> {
        {
            let mut inner = rt.lock();
            inner.forwards = forwards.to_vec();
            inner.last_ports = forwards.to_vec();
        }
        self.store
            .set_vm_forwards(&rt.id, forwards, &self.cfg.node_name)
            .await?;
        Ok(())
    }

    /// Make a launched QEMU, launched as `spec`, the VM's machine (its tap
    /// configured first).
    #[allow(clippy::too_many_arguments)]
    fn install(
        &self,
        rt: &VmSupervisor,
        machine: Arc<Machine>,
        spec: MachineSpec,
        link: &Option<Link>,
        restore: bool,
        t_prepare: std::time::Instant,
        t_qemu: std::time::Instant,
    ) -> anyhow::Result<Arc<Machine>> {
        let t_tap = std::time::Instant::now();
        if let Some(link) = link
            && let Err(e) = self.network.configure(link)
        {
            machine.kill();
            return Err(e.context("configuring the vm's tap device"));
        }
        let ms = |a: std::time::Instant, b: std::time::Instant| {
            b.duration_since(a).as_secs_f64() * 1000.0
        };
        tracing::debug!(vm = %rt.id, restore,
            prepare_ms = ms(t_prepare, t_qemu), qemu_ms = ms(t_qemu, t_tap),
            tap_ms = ms(t_tap, std::time::Instant::now()), "launch steps");
        let mut inner = rt.lock();
        inner.machine = Some(machine.clone());
        inner.launched = Some(spec);
        // A cold boot takes its address from the kernel parameters; a
        // restored guest holds the snapshot's until the agent has been heard.
        inner.guest_net = match (restore, link) {
            (false, Some(link)) => Some(link.addressing()),
            _ => None,
        };
        Ok(machine)
    }

    /// A cold boot of a VM whose top disk layer belongs to a snapshot (a
    /// suspended VM that was stopped) writes to a new layer over it: the
    /// snapshot's layers stay frozen.
    async fn unfreeze_top_layer(
        &self,
        vm: &model::Vm,
        layers: &mut Vec<String>,
    ) -> anyhow::Result<()> {
        let top = layers.last().context("vm has no disk layer")?;
        let frozen = self
            .store
            .list_snapshots(&vm.id)
            .await?
            .iter()
            .any(|r| r.layers.contains(top));
        if !frozen {
            return Ok(());
        }
        let dir = self.paths(&vm.id).dir;
        let new_layer = crate::snapshot::new_layer_name();
        hatch_vmm::disk::create_overlay(
            &dir.join(top),
            "qcow2",
            &dir.join(&new_layer),
            vm.disk_mib,
        )
        .await?;
        layers.push(new_layer);
        self.store
            .set_disk_layers(&vm.id, layers, &self.cfg.node_name)
            .await?;
        Ok(())
    }

    /// Watch a machine until QEMU exits and record an exit nobody asked for.
    pub(crate) fn watch(self: &Arc<Self>, rt: Arc<VmSupervisor>, machine: Arc<Machine>) {
        let this = self.clone();
        {
            let mut inner = rt.lock();
            let watched = inner.watched.as_ref().and_then(std::sync::Weak::upgrade);
            if watched.is_some_and(|w| Arc::ptr_eq(&w, &machine)) {
                return; // a warm standby's QEMU, back: its watcher still waits
            }
            inner.watched = Some(Arc::downgrade(&machine));
        }
        tokio::spawn(async move {
            let exit = machine.wait_exit().await;
            let state = {
                let mut inner = rt.lock();
                let ours = inner
                    .machine
                    .as_ref()
                    .is_some_and(|m| Arc::ptr_eq(m, &machine));
                if !ours {
                    return;
                }
                inner.machine = None;
                inner.state
            };
            // Stop, delete and other operations handle the exits they cause.
            if !matches!(state, VmState::Running | VmState::Starting) {
                return;
            }
            this.clear_forwards(&rt).await;
            this.remove_runtime_files(&rt.id);
            let (to, mut reason) = unexpected_exit(&exit);
            if exit.reason.as_deref() == Some("guest-shutdown")
                && let Some(why) = app_exit_reason(&this.paths(&rt.id).console_log)
            {
                reason = format!("{why}; the VM powered off");
            }
            if let Err(e) = this.transition(&rt, to, Some(reason)).await {
                tracing::error!(vm = %rt.id, error = %e, "recording exit failed");
            }
        });
    }

    /// Poll the guest's forwarded ports until one answers HTTP: the VM is
    /// then ready (held requests go in) and its boot time recorded.
    pub(crate) async fn measure_boot(&self, rt: Arc<VmSupervisor>, started: Instant) {
        let deadline = started + PROBE_LIMIT;
        while Instant::now() < deadline {
            let ports: Vec<u16> = {
                let inner = rt.lock();
                match inner.state {
                    _ if inner.ready => return,
                    VmState::Running => inner.forwards.iter().map(|f| f.host).collect(),
                    // A checkpoint pauses the guest: probe again after it.
                    VmState::Snapshotting => Vec::new(),
                    _ => return,
                }
            };
            let probes = ports.into_iter().map(http_answers);
            if futures_util::future::join_all(probes)
                .await
                .into_iter()
                .any(|ok| ok)
            {
                let ms = started.elapsed().as_millis() as u64;
                rt.set_ready(true);
                self.metrics.boot_seconds.observe(ms as f64 / 1000.0);
                if let Err(e) = self.store.set_vm_boot_ms(&rt.id, ms).await {
                    tracing::warn!(vm = %rt.id, error = %e, "recording boot time failed");
                }
                tracing::info!(vm = %rt.id, boot_ms = ms, "guest answers HTTP");
                return;
            }
            // The guest gives no signal when its app is up; polling is the
            // only way to see it.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        // The app may not speak HTTP: requests are not held any longer.
        tracing::warn!(vm = %rt.id, "the guest's app never answered HTTP on a forwarded port; counting it as ready");
        if rt.state() == VmState::Running {
            rt.set_ready(true);
        }
    }

    /// A snapshot or restore was cut short by a daemon restart while QEMU ran.
    async fn recover_interrupted(
        &self,
        rt: &Arc<VmSupervisor>,
        machine: &Machine,
        state: VmState,
    ) -> anyhow::Result<()> {
        let status = machine.command(&hatch_qmp::commands::QueryStatus).await?;
        let restored = state == VmState::Restoring && status.running;
        let snapshotting = state == VmState::Snapshotting;
        if snapshotting {
            // A capture pauses the guest; let it run again.
            if !status.running {
                machine.resume().await?;
            }
            self.transition(rt, VmState::Running, None)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        } else if restored {
            // The guest runs: a restore that had loaded its state (or a
            // rollback stopped before it ended the old guest). Either way
            // its clock is put right before it counts as running.
            if let Err(e) = self.sync_guest_clock(rt, None).await {
                self.halt(rt).await;
                // A fork has no snapshot of its own to be restored from.
                let to = if self.has_restorable_snapshot(&rt.id).await? {
                    VmState::Snapshotted
                } else {
                    VmState::Failed
                };
                self.transition(
                    rt,
                    to,
                    Some(format!(
                        "restore interrupted by a daemon restart; then {e:#}"
                    )),
                )
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
                return Ok(());
            }
            self.transition(rt, VmState::Running, None)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        } else {
            // A restore that had not loaded its state: start it over later
            // (a fork, which has no snapshot of its own, cannot be).
            machine.kill();
            machine.wait_exit().await;
            rt.lock().machine = None;
            self.clear_forwards(rt).await;
            self.end_lazy_ram(&rt.id).await?;
            self.remove_runtime_files(&rt.id);
            let (to, reason) = if self.has_restorable_snapshot(&rt.id).await? {
                (
                    VmState::Snapshotted,
                    "restore interrupted by a daemon restart; restore again",
                )
            } else {
                (
                    VmState::Failed,
                    "interrupted by a daemon restart before its guest ran",
                )
            };
            self.transition(rt, to, Some(reason.into()))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        Ok(())
    }

    /// A snapshot to restore from: a complete local copy, or one in S3.
    async fn has_restorable_snapshot(&self, vm_id: &str) -> anyhow::Result<bool> {
        Ok(self
            .store
            .list_snapshots(vm_id)
            .await?
            .iter()
            .any(|r| r.local || r.snap.status == crate::model::SnapshotStatus::Ready))
    }

    /// Make the recorded disk chain the one QEMU has open. A crash between a
    /// layer switch (checkpoint) or a flattening (compaction) and its record
    /// leaves them apart; QEMU's is the truth the guest writes to.
    pub(crate) async fn reconcile_disk_chain(
        &self,
        vm_id: &str,
        machine: &Machine,
    ) -> anyhow::Result<()> {
        self.faults.hit("disk_chain.read", vm_id)?;
        let dir = self.paths(vm_id).dir;
        let mut layers: Vec<String> = machine
            .disk_chain()
            .await?
            .into_iter()
            .take_while(|p| p.parent() == Some(dir.as_path()))
            .filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
            .take_while(|name| crate::snapshot::names::is_layer_name(name))
            .collect();
        layers.reverse();
        anyhow::ensure!(!layers.is_empty(), "QEMU reports no disk layer of this vm");
        let recorded = self.store.disk_layers(vm_id).await?;
        if recorded != layers {
            tracing::warn!(vm = %vm_id, ?recorded, actual = ?layers,
                "the recorded disk chain differs from QEMU's; taking QEMU's");
            self.store
                .set_disk_layers(vm_id, &layers, &self.cfg.node_name)
                .await?;
        }
        Ok(())
    }

    /// At start-up: re-attach to VMs whose QEMU still runs, and record the
    /// others as stopped, snapshotted or failed with the reason. One VM
    /// whose recovery fails is marked failed with the reason; the others,
    /// and the daemon, come up.
    pub async fn recover(self: &Arc<Self>) -> anyhow::Result<()> {
        let me = self.cfg.node_name.as_str();
        for rec in self.store.list_vms().await? {
            let vm = rec.vm;
            match vm.node.as_deref() {
                // Another node's VM (taken over or moved while this daemon
                // was away): not ours to re-attach or judge; a QEMU of it
                // still running here must go.
                Some(node) if node != me => {
                    let paths = self.paths(&vm.id);
                    if let Ok(machine) = Machine::adopt(&paths.pid_file, &paths.qmp_socket).await {
                        tracing::warn!(vm = %vm.id, owner = %node, pid = machine.pid(),
                            "ending a qemu of a vm another node owns now");
                        machine.kill();
                        self.remove_runtime_files(&vm.id);
                    }
                    continue;
                }
                Some(_) => {}
                // From before nodes were recorded: this daemon's.
                None => self.store.set_vm_node(&vm.id, me).await?,
            }
            let rt = VmSupervisor::new(vm.id.clone(), vm.state, rec.forwards.clone());
            self.insert_supervisor(rt.clone());
            let recovered = async {
                self.faults.hit("recover", &vm.id)?;
                self.recover_vm(&rt, vm.state).await
            };
            if let Err(e) = recovered.await {
                let reason = format!("recovery after a daemon restart failed: {e:#}");
                tracing::error!(vm = %vm.id, %reason);
                // A QEMU left running but unmanaged would hold the VM's
                // disk and memory with nobody watching: stop it. Without a
                // QEMU its files stay as they are (the RAM file may be an
                // interrupted suspend's memory image).
                if rt.machine().is_none() {
                    let paths = self.paths(&vm.id);
                    if let Ok(m) = Machine::adopt(&paths.pid_file, &paths.qmp_socket).await {
                        rt.lock().machine = Some(Arc::new(m));
                    }
                }
                if rt.machine().is_some() {
                    self.halt(&rt).await;
                }
                self.clear_forwards(&rt).await;
                if let Err(e) = self.transition(&rt, VmState::Failed, Some(reason)).await {
                    tracing::error!(vm = %vm.id, error = %e, "recording the failed recovery failed");
                }
            }
        }
        Ok(())
    }

    /// Whether `machine`, the QEMU of VM `id` found in state Snapshotting,
    /// had saved the state of a suspend: QEMU paused after an outgoing
    /// migration, and the VM's newest snapshot (the one being captured) a
    /// suspend, capturing or already recorded, whose state file is
    /// complete. A checkpoint's QEMU is in that state between saving and
    /// resuming, and is resumed; so is one whose save had not completed.
    async fn saved_its_suspend(&self, id: &str, machine: &Machine) -> anyhow::Result<bool> {
        use model::{SnapshotKind, SnapshotStatus};
        let status = machine.command(&hatch_qmp::commands::QueryStatus).await?;
        if status.running || status.status != "postmigrate" {
            return Ok(false);
        }
        // The one capturing, else the newest (a capture already recorded).
        let snapshots = self.store.list_snapshots(id).await?;
        let current = snapshots
            .iter()
            .find(|r| r.snap.status == SnapshotStatus::Capturing)
            .or(snapshots.first());
        Ok(current.is_some_and(|r| {
            r.snap.kind == SnapshotKind::Suspend
                && matches!(
                    r.snap.status,
                    SnapshotStatus::Capturing | SnapshotStatus::Uploading
                )
                && self.snapshot_dir(&r.snap.id).join("state").exists()
        }))
    }

    async fn recover_vm(
        self: &Arc<Self>,
        rt: &Arc<VmSupervisor>,
        state: VmState,
    ) -> anyhow::Result<()> {
        let id = rt.id.clone();
        if !state.has_process() {
            // A standby QEMU a previous daemon left (it died before ending
            // it): this daemon did not start it and will not use it.
            let paths = self.paths(&id);
            if let Ok(stray) = Machine::adopt(&paths.pid_file, &paths.qmp_socket).await {
                tracing::info!(vm = %id, pid = stray.pid(), "ending a standby QEMU left by the previous daemon");
                stray.kill();
                stray.wait_exit().await;
                // Not the RAM file: it may be an interrupted suspend's image.
                for f in [&paths.qmp_socket, &paths.agent_socket, &paths.pid_file] {
                    let _ = std::fs::remove_file(f);
                }
            }
            // A suspend that could not be completed after its QEMU ended
            // left the VM failed with its saved state kept: finish it now.
            if state == VmState::Failed && self.complete_interrupted_capture(&id).await? {
                self.transition(
                    rt,
                    VmState::Snapshotted,
                    Some("an interrupted suspend was completed at start".into()),
                )
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            return Ok(());
        }
        let paths = self.paths(&id);
        let mut adopted = Machine::adopt(&paths.pid_file, &paths.qmp_socket).await;
        if state == VmState::Snapshotting
            && let Ok(machine) = &adopted
            && self.saved_its_suspend(&id, machine).await?
        {
            // The QEMU of a suspend that had saved its state (one being
            // kept warm, or not yet ended): it is ended and the suspend
            // completed as if it had been, before anything else looks at
            // it. Resuming it would run the guest over a RAM file the
            // suspend may have moved into its snapshot already.
            tracing::info!(vm = %id, pid = machine.pid(), "ending the QEMU of an interrupted suspend that saved its state");
            machine.kill();
            machine.wait_exit().await;
            adopted = Err(VmmError::Launch("its suspend had saved its state".into()));
        }
        match adopted {
            Ok(machine) => {
                machine.set_command_timeout(self.cfg.qmp_timeout);
                let machine = Arc::new(machine);
                rt.lock().machine = Some(machine.clone());
                tracing::info!(vm = %id, pid = machine.pid(), "re-attached to running vm");
                self.watch(rt.clone(), machine.clone());
                // The firewall was made anew at start: its egress policy
                // again, and its link as the tap has it.
                if let Some(rec) = self.store.get_vm(&id).await?
                    && let Err(e) = self.network.readopt(&id, rec.vm.settings.network.as_ref())
                {
                    tracing::warn!(vm = %id, error = format!("{e:#}"), "restoring the vm's outbound network failed");
                }
                if let Err(e) = self.reconcile_disk_chain(&id, &machine).await {
                    // Not worth stopping a running guest for; the recorded
                    // chain stays (and its layers are not pruned).
                    tracing::warn!(vm = %id, error = format!("{e:#}"), "cannot read the disk chain from QEMU");
                }
                match state {
                    VmState::Stopping => {
                        // The stop was interrupted: finish it.
                        self.halt(rt).await;
                        self.transition(rt, VmState::Stopped, None)
                            .await
                            .map_err(|e| anyhow::anyhow!("{e}"))?;
                    }
                    VmState::Starting => {
                        self.transition(rt, VmState::Running, None)
                            .await
                            .map_err(|e| anyhow::anyhow!("{e}"))?;
                        let (this, rt) = (self.clone(), rt.clone());
                        tokio::spawn(async move { this.measure_boot(rt, Instant::now()).await });
                    }
                    VmState::Snapshotting | VmState::Restoring => {
                        self.recover_interrupted(rt, &machine, state).await?;
                    }
                    _ => {}
                }
                // A lazy wake's memory still arriving: a corrupt chunk the
                // fill finds is reported as after the wake itself.
                if rt.state() == VmState::Running
                    && let Some(snapshot) = self.lazy_ram_snapshot(&id)
                {
                    self.watch_lazy_fill(rt.clone(), snapshot);
                }
                if rt.state() == VmState::Running && rt.lock().agent.is_none() {
                    // Hold the agent channel open, as a boot does.
                    if let Ok(agent) = hatch_vmm::agent::Agent::connect(&paths.agent_socket).await {
                        rt.lock().agent = Some(agent);
                    }
                }
            }
            Err(e) => {
                // A lazy RAM server of a wake cut short before its QEMU ran.
                if state != VmState::Snapshotting {
                    self.end_lazy_ram(&id).await?;
                }
                let restorable = (state == VmState::Snapshotting
                    && self.complete_interrupted_capture(&id).await?)
                    || self.has_restorable_snapshot(&id).await?;
                let (to, reason) = if state == VmState::Stopping {
                    (VmState::Stopped, None)
                } else if restorable && matches!(state, VmState::Snapshotting | VmState::Restoring)
                {
                    (
                        VmState::Snapshotted,
                        Some(
                            "interrupted by a daemon restart; restorable from its snapshots".into(),
                        ),
                    )
                } else {
                    (
                        VmState::Failed,
                        Some(format!(
                            "QEMU was no longer running when the daemon restarted ({e})"
                        )),
                    )
                };
                self.clear_forwards(rt).await;
                self.remove_runtime_files(&id);
                self.transition(rt, to, reason)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
        }
        Ok(())
    }
}

/// The state and reason for a QEMU exit that no operation asked for.
fn unexpected_exit(exit: &Exit) -> (VmState, String) {
    match exit.reason.as_deref() {
        Some("guest-shutdown") => (VmState::Stopped, "the guest powered off".to_string()),
        Some("guest-panic") => (
            VmState::Failed,
            "the guest kernel panicked; see `hatch vm logs`".to_string(),
        ),
        Some(other) => (
            VmState::Failed,
            format!("QEMU exited ({other}); see `hatch vm logs`"),
        ),
        None => (
            VmState::Failed,
            "QEMU exited unexpectedly (killed?); see `hatch vm logs`".to_string(),
        ),
    }
}

/// Why an imported image's app ended, from the last words of the guest's
/// PID 1 on the console (`hatch: the app exited with status 3; powering
/// off`). The console is the guest's: only a short printable line is taken.
fn app_exit_reason(console: &std::path::Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(console).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(8192))).ok()?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).ok()?;
    let text = String::from_utf8_lossy(&tail);
    // Only PID 1's last line counts (not an earlier boot's, not the app's
    // own output): the last one besides the kernel's power-off messages.
    let kernel = |l: &str| l.starts_with('[') || l.starts_with("reboot:");
    let last = text
        .lines()
        .map(str::trim)
        .rev()
        .find(|l| !l.is_empty() && !kernel(l))?;
    let why = last
        .trim_end()
        .strip_prefix("hatch: ")?
        .strip_suffix("; powering off")?;
    Some(why.chars().filter(|c| !c.is_control()).take(300).collect())
}

/// What every launch of a VM shares ([`VmManager::launch_plan`]).
pub(crate) struct LaunchPlan {
    pub vm: model::Vm,
    pub image: hatch_image::Image,
    pub guest_ports: BTreeSet<u16>,
    pub extra_cmdline: Vec<String>,
    pub link: Option<Link>,
}

impl LaunchPlan {
    /// The QEMU command line of a launch over disk layer `top` (in the VM's
    /// directory) with guest RAM `mem_path` and these port forwards.
    pub fn spec(
        &self,
        vms: &VmManager,
        top: &str,
        restore: bool,
        mem_path: std::path::PathBuf,
        forwards: Vec<PortForward>,
    ) -> MachineSpec {
        let paths = vms.paths(&self.vm.id);
        MachineSpec {
            accel: vms.accel(),
            cpu_model: vms.cpu_model.clone(),
            vcpus: self.vm.vcpus,
            memory_mib: self.vm.memory_mib,
            kernel: self.image.kernel.clone(),
            initrd: self.image.initrd.clone(),
            cmdline: self.image.cmdline.clone(),
            disk: paths.dir.join(top),
            disk_node: crate::snapshot::node_name(top),
            incoming: restore,
            mem_path,
            qmp_socket: paths.qmp_socket,
            agent_socket: paths.agent_socket,
            console_log: paths.console_log,
            pid_file: paths.pid_file,
            forwards,
            tsc_khz: vms.tsc_khz,
            extra_cmdline: self.extra_cmdline.clone(),
            egress_tap: self.link.as_ref().map(|l| l.tap.clone()),
        }
    }
}

/// Host ports for `guest_ports`: the previous run's while `reuse` and they
/// are free, else new ones.
pub(crate) fn pick_forwards(
    guest_ports: &BTreeSet<u16>,
    previous: &[PortForward],
    reuse: bool,
) -> anyhow::Result<Vec<PortForward>> {
    guest_ports
        .iter()
        .map(|&guest| {
            let host = match previous.iter().find(|f| f.guest == guest) {
                Some(f) if reuse && host_port_free(f.host) => f.host,
                _ => hatch_vmm::host::free_port()?,
            };
            Ok(PortForward { host, guest })
        })
        .collect::<std::io::Result<Vec<_>>>()
        .context("picking host ports")
}

/// Whether nothing listens on 127.0.0.1:port now.
fn host_port_free(port: u16) -> bool {
    std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// Whether an HTTP server answers on 127.0.0.1:port. QEMU's user network
/// accepts the TCP connection even when nothing listens in the guest, so only
/// an HTTP status line counts.
async fn http_answers(port: u16) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(b"GET / HTTP/1.0\r\nHost: hatch-probe\r\n\r\n")
            .await?;
        let mut buf = [0u8; 12];
        let n = s.read(&mut buf).await?;
        Ok::<bool, std::io::Error>(buf[..n].starts_with(b"HTTP/1."))
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(250), attempt).await,
        Ok(Ok(true))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_explained() {
        let e = |r: Option<&str>| {
            unexpected_exit(&Exit {
                reason: r.map(String::from),
            })
        };
        assert_eq!(e(Some("guest-shutdown")).0, VmState::Stopped);
        assert_eq!(e(Some("guest-panic")).0, VmState::Failed);
        assert!(e(None).1.contains("unexpectedly"));
    }
}
