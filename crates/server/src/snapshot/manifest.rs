//! The snapshot manifest: everything needed to restore a snapshot from S3.
//! It is uploaded after every object it references, so its presence is the
//! commit point; it carries a version and a checksum of its own body.

use hatch_chunks::FileChunks;
use serde::{Deserialize, Serialize};

pub const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub snapshot_id: String,
    pub vm_id: String,
    pub created_at: String,
    /// The VM configuration the state belongs to: a restore must launch the
    /// same machine (memory size, vCPUs, image) for the state to load.
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    /// QEMU version that saved the device state.
    pub qemu_version: String,
    pub device_state: FileChunks,
    pub memory: FileChunks,
    /// Disk layers, oldest first; the first is backed by the image's base disk.
    pub disk_layers: Vec<Layer>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    pub name: String,
    pub chunks: FileChunks,
}

/// The stored form: the manifest and the BLAKE3 hash of its JSON.
#[derive(Serialize, Deserialize)]
struct Envelope {
    checksum: String,
    manifest: serde_json::Value,
}

pub fn manifest_key(vm_id: &str, snapshot_id: &str) -> String {
    format!("manifests/{vm_id}/{snapshot_id}.json")
}

impl Manifest {
    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        let body = serde_json::to_value(self)?;
        let checksum = blake3::hash(body.to_string().as_bytes())
            .to_hex()
            .to_string();
        serde_json::to_vec(&Envelope {
            checksum,
            manifest: body,
        })
    }

    pub fn decode(bytes: &[u8]) -> Result<Manifest, String> {
        let env: Envelope =
            serde_json::from_slice(bytes).map_err(|e| format!("not a manifest: {e}"))?;
        let actual = blake3::hash(env.manifest.to_string().as_bytes())
            .to_hex()
            .to_string();
        if actual != env.checksum {
            return Err("manifest checksum mismatch".into());
        }
        let m: Manifest =
            serde_json::from_value(env.manifest).map_err(|e| format!("bad manifest: {e}"))?;
        if m.version != MANIFEST_VERSION {
            return Err(format!("unsupported manifest version {}", m.version));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let chunks = FileChunks {
            len: 10,
            chunk_size: 1 << 20,
            chunks: vec![Some("ab".into())],
        };
        Manifest {
            version: MANIFEST_VERSION,
            snapshot_id: "snap-1".into(),
            vm_id: "vm-1".into(),
            created_at: "t".into(),
            image: "default".into(),
            vcpus: 1,
            memory_mib: 256,
            disk_mib: 1024,
            qemu_version: "7.2.0".into(),
            device_state: chunks.clone(),
            memory: chunks.clone(),
            disk_layers: vec![Layer {
                name: "disk.qcow2".into(),
                chunks,
            }],
        }
    }

    #[test]
    fn round_trips_and_detects_tampering() {
        let m = sample();
        let bytes = m.encode().unwrap();
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        let tampered = String::from_utf8(bytes)
            .unwrap()
            .replace("\"vcpus\":1", "\"vcpus\":2");
        assert!(
            Manifest::decode(tampered.as_bytes())
                .unwrap_err()
                .contains("checksum")
        );
        assert!(Manifest::decode(b"{}").is_err());
    }
}
