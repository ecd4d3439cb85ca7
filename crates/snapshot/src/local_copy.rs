//! The description of a snapshot's local copy, `local.json` in its
//! directory: which VM and kind it is, the size and hash of the device
//! state, the size of the RAM image and of each disk layer. It is written
//! last, once every file it describes is complete and durable, and sealed
//! like a manifest. A restore from the local copy checks it first: a copy
//! that does not match (truncated by a crash, edited, or another VM's)
//! is not used.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::SnapshotKind;
use crate::durable;
use crate::manifest::MAX_STATE_BYTES;
use crate::names::{is_layer_name, is_snapshot_id, is_vm_id};
use crate::seal::{Seal, SealKeys};

pub const FILE: &str = "local.json";

/// Read a whole file that must not be larger than `max` bytes (a planted
/// huge file is refused, not read into memory).
fn read_at_most(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let len = std::fs::metadata(path)?.len();
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is {len} bytes, more than {max}", path.display()),
        ));
    }
    use std::io::Read;
    let mut buf = Vec::with_capacity(len as usize);
    std::fs::File::open(path)?.take(max).read_to_end(&mut buf)?;
    Ok(buf)
}
const FORMAT: &str = "hatch.snapshot-local";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalCopy {
    pub snapshot_id: String,
    pub vm_id: String,
    pub kind: SnapshotKind,
    pub state_len: u64,
    /// BLAKE3 of the device state (small; hashed in full).
    pub state_blake3: String,
    pub memory_len: u64,
    /// Disk layers, oldest first, with their sizes.
    pub layers: Vec<LayerSize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSize {
    pub name: String,
    pub len: u64,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    format: String,
    key_id: String,
    mac: String,
    copy: Box<serde_json::value::RawValue>,
}

impl LocalCopy {
    /// Describe the files as they are now: `dir` holds `state` and `mem`,
    /// `vm_dir` the layers.
    pub fn describe(
        dir: &Path,
        vm_dir: &Path,
        snapshot_id: &str,
        vm_id: &str,
        kind: SnapshotKind,
        layers: &[String],
    ) -> std::io::Result<LocalCopy> {
        let state = read_at_most(&dir.join("state"), MAX_STATE_BYTES)?;
        let memory_len = std::fs::metadata(dir.join("mem"))?.len();
        let layers = layers
            .iter()
            .map(|name| {
                Ok(LayerSize {
                    name: name.clone(),
                    len: std::fs::metadata(vm_dir.join(name))?.len(),
                })
            })
            .collect::<std::io::Result<_>>()?;
        Ok(LocalCopy {
            snapshot_id: snapshot_id.to_string(),
            vm_id: vm_id.to_string(),
            kind,
            state_len: state.len() as u64,
            state_blake3: blake3::hash(&state).to_hex().to_string(),
            memory_len,
            layers,
        })
    }

    /// Seal and write `local.json` into `dir` (temporary name, fsync,
    /// rename, fsync of the directory).
    pub fn write(&self, dir: &Path, keys: &SealKeys) -> std::io::Result<()> {
        let body = serde_json::to_string(self)?;
        let seal = keys.seal(body.as_bytes());
        let bytes = serde_json::to_vec(&Envelope {
            format: FORMAT.into(),
            key_id: seal.key_id,
            mac: seal.mac,
            copy: serde_json::value::RawValue::from_string(body)?,
        })?;
        durable::write(&dir.join(FILE), &bytes)
    }

    /// Read and check the local copy of snapshot `snapshot_id` of `vm_id`
    /// against its files. The error says what does not match.
    pub fn verify(
        dir: &Path,
        vm_dir: &Path,
        snapshot_id: &str,
        vm_id: &str,
        memory_len: u64,
        keys: &SealKeys,
    ) -> Result<LocalCopy, String> {
        let bytes = read_at_most(&dir.join(FILE), 1 << 20).map_err(|e| format!("{FILE}: {e}"))?;
        let env: Envelope =
            serde_json::from_slice(&bytes).map_err(|e| format!("{FILE} is malformed: {e}"))?;
        if env.format != FORMAT {
            return Err(format!("{FILE} has format {:?}", env.format));
        }
        let seal = Seal {
            key_id: env.key_id,
            mac: env.mac,
        };
        keys.verify(&seal, env.copy.get().as_bytes())
            .map_err(|e| format!("{FILE} is not authentic: {e}"))?;
        let copy: LocalCopy = serde_json::from_str(env.copy.get())
            .map_err(|e| format!("{FILE} is malformed: {e}"))?;
        if copy.snapshot_id != snapshot_id || copy.vm_id != vm_id {
            return Err(format!(
                "{FILE} describes {} of {}, not {snapshot_id} of {vm_id}",
                copy.snapshot_id, copy.vm_id
            ));
        }
        if !is_snapshot_id(&copy.snapshot_id) || !is_vm_id(&copy.vm_id) {
            return Err(format!("{FILE} names ids Hatch never writes"));
        }
        if copy.layers.is_empty() || copy.layers.iter().any(|l| !is_layer_name(&l.name)) {
            return Err(format!("{FILE} lists bad disk layer names"));
        }
        if copy.memory_len != memory_len {
            return Err(format!(
                "its RAM image is {} bytes, the vm has {memory_len}",
                copy.memory_len
            ));
        }
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).ok();
        if size(&dir.join("mem")) != Some(copy.memory_len) {
            return Err("the RAM image is missing or of the wrong size".into());
        }
        if size(&dir.join("state")) != Some(copy.state_len) {
            return Err("the device state does not match its description".into());
        }
        let state = read_at_most(&dir.join("state"), copy.state_len.min(MAX_STATE_BYTES))
            .map_err(|e| format!("device state: {e}"))?;
        if state.len() as u64 != copy.state_len
            || blake3::hash(&state).to_hex().as_str() != copy.state_blake3
        {
            return Err("the device state does not match its description".into());
        }
        for layer in &copy.layers {
            if size(&vm_dir.join(&layer.name)) != Some(layer.len) {
                return Err(format!(
                    "disk layer {} is missing or of the wrong size",
                    layer.name
                ));
            }
        }
        Ok(copy)
    }

    pub fn layer_names(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.name.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let (dir, vm_dir) = (t.path().join("snap"), t.path().join("vm"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&vm_dir).unwrap();
        std::fs::write(dir.join("state"), b"device state").unwrap();
        std::fs::File::create(dir.join("mem"))
            .unwrap()
            .set_len(4096)
            .unwrap();
        std::fs::write(vm_dir.join("disk.qcow2"), b"layer").unwrap();
        (t, dir, vm_dir)
    }

    const SNAP: &str = "snap-abcdefghijkl";
    const VM: &str = "vm-abcdefghijkl";

    #[test]
    fn a_copy_verifies_until_anything_changes() {
        let (_t, dir, vm_dir) = setup();
        let keys = SealKeys::new(b"k", &[]);
        let layers = vec!["disk.qcow2".to_string()];
        let copy =
            LocalCopy::describe(&dir, &vm_dir, SNAP, VM, SnapshotKind::Suspend, &layers).unwrap();
        copy.write(&dir, &keys).unwrap();
        let check = || LocalCopy::verify(&dir, &vm_dir, SNAP, VM, 4096, &keys);
        assert_eq!(check().unwrap(), copy);
        assert!(LocalCopy::verify(&dir, &vm_dir, SNAP, "vm-zzzzzzzzzzzz", 4096, &keys).is_err());
        assert!(LocalCopy::verify(&dir, &vm_dir, SNAP, VM, 8192, &keys).is_err());
        assert!(
            LocalCopy::verify(&dir, &vm_dir, SNAP, VM, 4096, &SealKeys::new(b"x", &[])).is_err()
        );

        std::fs::File::options()
            .write(true)
            .open(dir.join("mem"))
            .unwrap()
            .set_len(100)
            .unwrap();
        assert!(check().unwrap_err().contains("RAM image"));
        std::fs::File::options()
            .write(true)
            .open(dir.join("mem"))
            .unwrap()
            .set_len(4096)
            .unwrap();
        std::fs::write(dir.join("state"), b"device statE").unwrap();
        assert!(check().unwrap_err().contains("device state"));
        std::fs::write(dir.join("state"), b"device state").unwrap();
        std::fs::write(vm_dir.join("disk.qcow2"), b"lay").unwrap();
        assert!(check().unwrap_err().contains("disk.qcow2"));
        std::fs::write(vm_dir.join("disk.qcow2"), b"layer").unwrap();
        assert!(check().is_ok());
        let text = std::fs::read_to_string(dir.join(FILE)).unwrap();
        std::fs::write(dir.join(FILE), text.replace("suspend", "checkpoint")).unwrap();
        assert!(check().unwrap_err().contains("not authentic"));
    }
}
