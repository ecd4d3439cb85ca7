//! The snapshot manifest: everything needed to restore a snapshot from S3.
//! It is uploaded after every object it references, so its presence is the
//! commit point. It is sealed (`seal.rs`) and, when read back, validated
//! field by field against the forms Hatch writes and the VM it is restored
//! into: the bucket is not trusted.

use hatch_chunks::FileChunks;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::SnapshotKind;
use crate::envelope;
use crate::names::{is_layer_name, is_snapshot_id, is_vm_id};
use crate::seal::{SealError, SealKeys};

/// Version 2: sealed with a MAC, records the snapshot's kind. Version 1
/// (a bare checksum) is refused for restores: anyone could have written it.
pub const MANIFEST_VERSION: u32 = 2;
const FORMAT: &str = "hatch.snapshot-manifest";

/// Largest manifest read back (a 64 GiB guest's lists are ~5 MiB).
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// Largest device state (it is ~60 KiB with x-ignore-shared).
pub const MAX_STATE_BYTES: u64 = 256 << 20;
/// Most disk layers a snapshot may list (chains are flattened past 8).
pub const MAX_LAYERS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    pub snapshot_id: String,
    pub vm_id: String,
    pub kind: SnapshotKind,
    pub created_at: String,
    /// The VM configuration the state belongs to: a restore must launch the
    /// same machine (memory size, vCPUs, image) for the state to load.
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    /// QEMU version that saved the device state.
    pub qemu_version: String,
    /// QEMU `-cpu` model the guest ran with: a restore needs the same
    /// (empty in manifests from before it was recorded: not checked).
    #[serde(default)]
    pub cpu_model: String,
    /// With `cpu_model` `host`: the host CPU's signature
    /// (`hatch_vmm::host::cpu_signature`), which a restore needs too.
    #[serde(default)]
    pub host_cpu: String,
    pub device_state: FileChunks,
    pub memory: FileChunks,
    /// Memory chunks the guest asked for first after its previous wake, in
    /// that order: a lazy wake fetches them before the rest. (Omitted when
    /// empty, so that daemons from before it read such manifests.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefetch: Vec<u32>,
    /// Disk layers, oldest first; the first is backed by the image's base disk.
    pub disk_layers: Vec<Layer>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub name: String,
    pub chunks: FileChunks,
}

/// What the restoring daemon knows independently of the bucket.
#[derive(Debug, Clone)]
pub struct Expected<'a> {
    pub vm_id: &'a str,
    pub snapshot_id: &'a str,
    pub image: &'a str,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    /// This node's `-cpu` model and CPU signature.
    pub cpu_model: &'a str,
    pub host_cpu: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is malformed: {0}")]
    Malformed(String),
    #[error("manifest is not authentic: {0}")]
    Unauthentic(#[from] SealError),
    #[error("manifest is invalid: {0}")]
    Invalid(String),
}

pub fn manifest_key(vm_id: &str, snapshot_id: &str) -> String {
    format!("manifests/{vm_id}/{snapshot_id}.json")
}

impl Manifest {
    pub fn encode(&self, keys: &SealKeys) -> Result<Vec<u8>, serde_json::Error> {
        envelope::seal(FORMAT, MANIFEST_VERSION, self, keys)
    }

    /// Parse, authenticate and validate a manifest read from the bucket.
    pub fn decode(
        bytes: &[u8],
        keys: &SealKeys,
        expected: &Expected<'_>,
    ) -> Result<Manifest, ManifestError> {
        let body = envelope::open(bytes, FORMAT, MANIFEST_VERSION, keys)?;
        let m: Manifest = serde_json::from_str(body.get())
            .map_err(|e| ManifestError::Malformed(e.to_string()))?;
        m.validate(expected).map_err(ManifestError::Invalid)?;
        Ok(m)
    }

    /// Every field against the forms Hatch writes and the VM it is for.
    fn validate(&self, e: &Expected<'_>) -> Result<(), String> {
        if self.version != MANIFEST_VERSION {
            return Err(format!("version {}", self.version));
        }
        if !is_vm_id(&self.vm_id) || self.vm_id != e.vm_id {
            return Err(format!("vm id {:?} (expected {})", self.vm_id, e.vm_id));
        }
        if !is_snapshot_id(&self.snapshot_id) || self.snapshot_id != e.snapshot_id {
            return Err(format!(
                "snapshot id {:?} (expected {})",
                self.snapshot_id, e.snapshot_id
            ));
        }
        if humantime::parse_rfc3339(&self.created_at).is_err() {
            return Err(format!("creation time {:?}", self.created_at));
        }
        if self.image != e.image || hatch_image::validate_image_name(&self.image).is_err() {
            return Err(format!("image {:?} (the vm's is {})", self.image, e.image));
        }
        if (self.vcpus, self.memory_mib, self.disk_mib) != (e.vcpus, e.memory_mib, e.disk_mib) {
            return Err(format!(
                "machine of {} vCPUs, {} MiB memory, {} MiB disk (the vm has {}, {}, {})",
                self.vcpus, self.memory_mib, self.disk_mib, e.vcpus, e.memory_mib, e.disk_mib
            ));
        }
        if self.qemu_version.len() > 256 || self.qemu_version.chars().any(char::is_control) {
            return Err("QEMU version string".into());
        }
        if !self.cpu_model.is_empty() && self.cpu_model != e.cpu_model {
            return Err(format!(
                "the guest ran with CPU model {:?} and this node runs {:?}: start every node of \
                 the cluster with the same --cpu-model",
                self.cpu_model, e.cpu_model
            ));
        }
        if self.cpu_model == "host" && !self.host_cpu.is_empty() && self.host_cpu != e.host_cpu {
            return Err(
                "the guest ran with CPU model \"host\" on a host with another CPU: pin a \
                 --cpu-model that every node supports to restore across hosts"
                    .into(),
            );
        }
        self.device_state
            .validate(MAX_STATE_BYTES)
            .map_err(|r| format!("device state: {r}"))?;
        self.memory
            .validate(e.memory_mib << 20)
            .map_err(|r| format!("memory: {r}"))?;
        if self.prefetch.len() > self.memory.chunks.len()
            || self
                .prefetch
                .iter()
                .any(|&i| i as usize >= self.memory.chunks.len())
        {
            return Err("memory prefetch list".into());
        }
        if self.memory.len != e.memory_mib << 20 {
            return Err(format!(
                "memory of {} bytes for a {} MiB vm",
                self.memory.len, e.memory_mib
            ));
        }
        if self.disk_layers.is_empty() || self.disk_layers.len() > MAX_LAYERS {
            return Err(format!("{} disk layers", self.disk_layers.len()));
        }
        // A qcow2 layer holds at most the virtual disk plus its metadata.
        let max_layer = (e.disk_mib << 20)
            .saturating_mul(2)
            .saturating_add(64 << 20);
        let mut seen = std::collections::HashSet::new();
        for layer in &self.disk_layers {
            if !is_layer_name(&layer.name) || !seen.insert(layer.name.as_str()) {
                return Err(format!("disk layer name {:?}", layer.name));
            }
            layer
                .chunks
                .validate(max_layer)
                .map_err(|r| format!("disk layer {}: {r}", layer.name))?;
        }
        if e.vcpus == 0 || e.memory_mib < crate::MIN_MEMORY_MIB {
            return Err("machine size".into());
        }
        Ok(())
    }

    /// The chunk ids a manifest references, for garbage collection, without
    /// authenticating it (a manifest another daemon sealed with a key we do
    /// not hold, or an older version, still protects its chunks).
    pub fn chunk_refs(bytes: &[u8]) -> Result<Vec<String>, String> {
        let (_, manifest) = envelope::unverified(bytes)?;
        let mut files: Vec<&Value> = vec![&manifest["device_state"], &manifest["memory"]];
        if let Some(layers) = manifest["disk_layers"].as_array() {
            files.extend(layers.iter().map(|l| &l["chunks"]));
        }
        envelope::chunk_ids(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(len: u64) -> FileChunks {
        let n = FileChunks::count(len, hatch_chunks::CHUNK_SIZE) as usize;
        FileChunks {
            len,
            chunk_size: hatch_chunks::CHUNK_SIZE,
            chunks: (0..n).map(|i| Some(format!("{:064x}", i + 1))).collect(),
        }
    }

    fn sample() -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            snapshot_id: "snap-abcdefghijkl".into(),
            vm_id: "vm-abcdefghijkl".into(),
            kind: SnapshotKind::Suspend,
            created_at: "2026-11-29T10:00:00Z".into(),
            image: "default".into(),
            vcpus: 1,
            memory_mib: 256,
            disk_mib: 1024,
            qemu_version: "QEMU emulator version 7.2.22".into(),
            cpu_model: "max".into(),
            host_cpu: "0123456789abcdef".into(),
            device_state: chunks(60_000),
            memory: chunks(256 << 20),
            prefetch: vec![3, 1, 200],
            disk_layers: vec![
                Layer {
                    name: "disk.qcow2".into(),
                    chunks: chunks(5 << 20),
                },
                Layer {
                    name: "layer-abcdefghijkl.qcow2".into(),
                    chunks: chunks(1 << 20),
                },
            ],
        }
    }

    fn expected(m: &Manifest) -> Expected<'_> {
        Expected {
            vm_id: &m.vm_id,
            snapshot_id: &m.snapshot_id,
            image: &m.image,
            vcpus: m.vcpus,
            memory_mib: m.memory_mib,
            disk_mib: m.disk_mib,
            cpu_model: &m.cpu_model,
            host_cpu: &m.host_cpu,
        }
    }

    fn keys() -> SealKeys {
        SealKeys::new(b"test secret", &[])
    }

    #[test]
    fn round_trips() {
        let m = sample();
        let bytes = m.encode(&keys()).unwrap();
        assert_eq!(Manifest::decode(&bytes, &keys(), &expected(&m)).unwrap(), m);
        let refs = Manifest::chunk_refs(&bytes).unwrap();
        assert_eq!(refs.len(), 1 + 256 + 5 + 1);
    }

    #[test]
    fn edited_or_forged_manifests_are_refused() {
        let m = sample();
        let bytes = String::from_utf8(m.encode(&keys()).unwrap()).unwrap();
        let edited = bytes.replace("\"vcpus\":1", "\"vcpus\":2");
        assert!(matches!(
            Manifest::decode(edited.as_bytes(), &keys(), &expected(&m)),
            Err(ManifestError::Unauthentic(SealError::Forged))
        ));
        // Sealed by someone else: refused even though it is well formed.
        let forged = m.encode(&SealKeys::new(b"attacker", &[])).unwrap();
        assert!(matches!(
            Manifest::decode(&forged, &keys(), &expected(&m)),
            Err(ManifestError::Unauthentic(SealError::UnknownKey(_)))
        ));
        // Version 1 (checksum only) proves nothing.
        let v1 = br#"{"checksum":"x","manifest":{}}"#;
        assert!(matches!(
            Manifest::decode(v1, &keys(), &expected(&m)),
            Err(ManifestError::Malformed(_))
        ));
        assert!(Manifest::decode(b"\xff", &keys(), &expected(&m)).is_err());
    }

    /// Even correctly sealed, a manifest naming things Hatch never writes,
    /// or another VM's state, is refused (a leaked secret must not give a
    /// path into the host).
    #[test]
    fn sealed_but_hostile_fields_are_refused() {
        type Edit = Box<dyn Fn(&mut Manifest)>;
        let cases: Vec<(&str, Edit)> = vec![
            (
                "layer name",
                Box::new(|m| m.disk_layers[1].name = "../../../etc/cron.d/x".into()),
            ),
            (
                "layer name",
                Box::new(|m| m.disk_layers[1].name = "layer-abcdefghijkl.qcow2,driver=ssh".into()),
            ),
            (
                "layer name",
                Box::new(|m| m.disk_layers[1].name = "disk.qcow2".into()),
            ),
            ("vm id", Box::new(|m| m.vm_id = "vm-zzzzzzzzzzzz".into())),
            (
                "snapshot id",
                Box::new(|m| m.snapshot_id = "snap-../../x".into()),
            ),
            ("image", Box::new(|m| m.image = "../other".into())),
            ("machine", Box::new(|m| m.memory_mib = 512)),
            ("memory", Box::new(|m| m.memory.len = 1 << 40)),
            ("memory prefetch", Box::new(|m| m.prefetch.push(256))),
            ("memory prefetch", Box::new(|m| m.prefetch = vec![0; 257])),
            (
                "memory",
                Box::new(|m| m.memory.chunks.pop().map(|_| ()).unwrap_or(())),
            ),
            (
                "device state",
                Box::new(|m| m.device_state = chunks(1 << 30)),
            ),
            (
                "device state",
                Box::new(|m| m.device_state.chunks[0] = Some("../../x".into())),
            ),
            (
                "disk layer",
                Box::new(|m| m.disk_layers[0].chunks = chunks(1 << 32)),
            ),
            ("disk layers", Box::new(|m| m.disk_layers.clear())),
            (
                "creation time",
                Box::new(|m| m.created_at = "yesterday".into()),
            ),
        ];
        let reference = sample();
        for (what, edit) in cases {
            let mut m = sample();
            edit(&mut m);
            let bytes = m.encode(&keys()).unwrap();
            let err = Manifest::decode(&bytes, &keys(), &expected(&reference)).unwrap_err();
            assert!(
                matches!(&err, ManifestError::Invalid(r) if r.contains(what)),
                "{what}: {err}"
            );
        }
    }

    /// A snapshot restores only on a node with the CPU model it ran with;
    /// under `host`, only on a host with the same CPU. Manifests from before
    /// the model was recorded are not checked.
    #[test]
    fn a_restore_needs_the_cpu_model_the_guest_ran_with() {
        let m = sample();
        let bytes = m.encode(&keys()).unwrap();
        let other = Expected {
            cpu_model: "Haswell-v4",
            ..expected(&m)
        };
        let err = Manifest::decode(&bytes, &keys(), &other).unwrap_err();
        assert!(
            matches!(&err, ManifestError::Invalid(r) if r.contains("CPU model \"max\"") && r.contains("--cpu-model")),
            "{err}"
        );
        let host = Manifest {
            cpu_model: "host".into(),
            ..sample()
        };
        let bytes = host.encode(&keys()).unwrap();
        assert!(Manifest::decode(&bytes, &keys(), &expected(&host)).is_ok());
        let elsewhere = Expected {
            host_cpu: "fedcba9876543210",
            ..expected(&host)
        };
        let err = Manifest::decode(&bytes, &keys(), &elsewhere).unwrap_err();
        assert!(
            matches!(&err, ManifestError::Invalid(r) if r.contains("another CPU")),
            "{err}"
        );
        // An older manifest without the fields restores anywhere.
        let old = Manifest {
            cpu_model: String::new(),
            host_cpu: String::new(),
            ..sample()
        };
        let text = serde_json::to_string(&old)
            .unwrap()
            .replace(",\"cpu_model\":\"\",\"host_cpu\":\"\"", "");
        assert!(!text.contains("cpu_model"));
        let parsed: Manifest = serde_json::from_str(&text).unwrap();
        assert!(parsed.validate(&other).is_ok());
    }
}
