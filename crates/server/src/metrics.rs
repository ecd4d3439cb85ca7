//! Prometheus metrics of the daemon, rendered at `GET /metrics`.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::model::VmState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WakeLabels {
    pub trigger: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabel {
    pub trigger: String,
}

/// One VM. Per-VM series exist for wakes, pauses and stored bytes only: one
/// series per VM and metric, removed when the VM is deleted (cardinality is
/// the number of VMs, documented in docs/ARCHITECTURE.md).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VmLabel {
    pub vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    pub vms: Family<StateLabel, Gauge>,
    pub boot_seconds: Histogram,
    pub proxy: hatch_proxy::ProxyMetrics,
    wakes: Family<WakeLabels, Counter>,
    wake_seconds: Family<TriggerLabel, Histogram>,
    idle_suspends: Family<ResultLabel, Counter>,
    uploads: Family<ResultLabel, Counter>,
    pub upload_queue: Gauge,
    pub pending_deletes: Gauge,
    pub local_bytes: Gauge,
    pub local_evictions: Counter,
    pub clock_sync_retries: Counter,
    pub clock_sync_failures: Counter,
    pub guest_readdressed: Counter,
    pub standby_wakes: Counter,
    pub standby_qemus: Gauge,
    vm_wakes: Family<VmLabel, Counter>,
    vm_last_wake: Family<VmLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    vm_last_pause: Family<VmLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    vm_stored_bytes: Family<VmLabel, Counter>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let vms = Family::<StateLabel, Gauge>::default();
        registry.register("hatch_vms", "VMs by lifecycle state", vms.clone());
        let boot_seconds =
            Histogram::new([0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 20.0, 40.0].into_iter());
        registry.register(
            "hatch_boot_duration_seconds",
            "Cold boot: QEMU launch until the guest first answers HTTP",
            boot_seconds.clone(),
        );
        let proxy = hatch_proxy::ProxyMetrics::register(&mut registry);
        let wakes = Family::<WakeLabels, Counter>::default();
        registry.register(
            "hatch_wakes",
            "Wakes of suspended VMs by trigger (request, api) and result",
            wakes.clone(),
        );
        let wake_seconds = Family::<TriggerLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(
                [
                    0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0,
                ]
                .into_iter(),
            )
        });
        registry.register(
            "hatch_wake_duration_seconds",
            "Wake latency: first held request (or API call) until the VM runs",
            wake_seconds.clone(),
        );
        let idle_suspends = Family::<ResultLabel, Counter>::default();
        registry.register(
            "hatch_idle_suspends",
            "Suspends of idle VMs by result",
            idle_suspends.clone(),
        );
        let uploads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "hatch_upload_attempts",
            "Snapshot upload attempts by result (failed ones are retried with backoff)",
            uploads.clone(),
        );
        let upload_queue = Gauge::default();
        registry.register(
            "hatch_upload_queue",
            "Snapshots captured and not yet in S3",
            upload_queue.clone(),
        );
        let pending_deletes = Gauge::default();
        registry.register(
            "hatch_pending_manifest_deletes",
            "Manifests whose deletion from S3 failed and is being retried",
            pending_deletes.clone(),
        );
        let local_bytes = Gauge::default();
        registry.register(
            "hatch_local_snapshot_bytes",
            "Bytes on disk of local snapshot copies",
            local_bytes.clone(),
        );
        let local_evictions = Counter::default();
        registry.register(
            "hatch_local_snapshot_evictions",
            "Local snapshot copies evicted (S3 holds them) to stay within the budget",
            local_evictions.clone(),
        );
        let clock_sync_retries = Counter::default();
        registry.register(
            "hatch_clock_sync_retries",
            "Guest clock/RNG sync attempts after the first, on restores",
            clock_sync_retries.clone(),
        );
        let guest_readdressed = Counter::default();
        registry.register(
            "hatch_guest_readdressed",
            "Restores that had the guest agent address the outbound card (the guest's address at the snapshot was not the new run's, or not known)",
            guest_readdressed.clone(),
        );
        let standby_wakes = Counter::default();
        registry.register(
            "hatch_standby_wakes",
            "Wakes that loaded the VM's state into a QEMU started ahead of them (a standby) instead of starting one",
            standby_wakes.clone(),
        );
        let standby_qemus = Gauge::default();
        registry.register(
            "hatch_standby_qemus",
            "Suspended VMs holding a QEMU started ahead of their next wake",
            standby_qemus.clone(),
        );
        let clock_sync_failures = Counter::default();
        registry.register(
            "hatch_clock_sync_failures",
            "Restores failed because the guest never confirmed its clock/RNG sync",
            clock_sync_failures.clone(),
        );
        let vm_wakes = Family::<VmLabel, Counter>::default();
        registry.register(
            "hatch_vm_wakes",
            "Wakes of one VM (successful)",
            vm_wakes.clone(),
        );
        let vm_last_wake = Family::<VmLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "hatch_vm_last_wake_seconds",
            "The last wake of one VM: first held request (or API call) until it ran",
            vm_last_wake.clone(),
        );
        let vm_last_pause = Family::<VmLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "hatch_vm_last_pause_seconds",
            "How long the last snapshot of one VM paused its guest",
            vm_last_pause.clone(),
        );
        let vm_stored_bytes = Family::<VmLabel, Counter>::default();
        registry.register(
            "hatch_vm_stored_bytes",
            "Bytes one VM's snapshots newly wrote to S3",
            vm_stored_bytes.clone(),
        );
        Metrics {
            vm_wakes,
            vm_last_wake,
            vm_last_pause,
            vm_stored_bytes,
            registry: Mutex::new(registry),
            uploads,
            upload_queue,
            pending_deletes,
            local_bytes,
            local_evictions,
            clock_sync_retries,
            clock_sync_failures,
            guest_readdressed,
            standby_wakes,
            standby_qemus,
            vms,
            boot_seconds,
            proxy,
            wakes,
            wake_seconds,
            idle_suspends,
        }
    }

    pub fn record_wake(&self, trigger: &str, result: &str, took: std::time::Duration) {
        self.wakes
            .get_or_create(&WakeLabels {
                trigger: trigger.into(),
                result: result.into(),
            })
            .inc();
        if result == "ok" {
            self.wake_seconds
                .get_or_create(&TriggerLabel {
                    trigger: trigger.into(),
                })
                .observe(took.as_secs_f64());
        }
    }

    /// A successful wake of `vm`.
    pub fn record_vm_wake(&self, vm: &str, took: std::time::Duration) {
        let label = VmLabel { vm: vm.into() };
        self.vm_wakes.get_or_create(&label).inc();
        self.vm_last_wake
            .get_or_create(&label)
            .set(took.as_secs_f64());
    }

    pub fn record_vm_pause(&self, vm: &str, pause_ms: u64) {
        self.vm_last_pause
            .get_or_create(&VmLabel { vm: vm.into() })
            .set(pause_ms as f64 / 1000.0);
    }

    pub fn record_vm_stored(&self, vm: &str, bytes: u64) {
        self.vm_stored_bytes
            .get_or_create(&VmLabel { vm: vm.into() })
            .inc_by(bytes);
    }

    /// A deleted VM's series go with it.
    pub fn forget_vm(&self, vm: &str) {
        let label = VmLabel { vm: vm.into() };
        self.vm_wakes.remove(&label);
        self.vm_last_wake.remove(&label);
        self.vm_last_pause.remove(&label);
        self.vm_stored_bytes.remove(&label);
    }

    pub fn record_upload(&self, result: &str) {
        self.uploads
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    pub fn record_idle_suspend(&self, result: &str) {
        self.idle_suspends
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    /// Set the per-state gauges and render the text exposition format.
    pub fn render(&self, states: impl IntoIterator<Item = VmState>) -> String {
        let mut counts = std::collections::HashMap::new();
        for s in states {
            *counts.entry(s).or_insert(0i64) += 1;
        }
        for s in VmState::ALL {
            self.vms
                .get_or_create(&StateLabel {
                    state: s.as_str().to_string(),
                })
                .set(counts.get(&s).copied().unwrap_or(0));
        }
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
