//! The image manifest: an imported image as stored in S3, so that any node
//! of a cluster can boot or restore a VM of it. Its files (kernel, initrd,
//! base disk) are content-addressed chunks like snapshot memory, shared
//! with every other image and snapshot holding the same bytes. The
//! manifest is written after them (its presence is the commit point),
//! sealed like snapshot manifests, and validated field by field when read
//! back: the bucket is not trusted.

use hatch_chunks::FileChunks;
use hatch_image::oci::AppConfig;
use serde::{Deserialize, Serialize};

use crate::envelope;
use crate::manifest::ManifestError;
use crate::names::is_image_id;
use crate::seal::SealKeys;

pub const IMAGE_MANIFEST_VERSION: u32 = 1;
const FORMAT: &str = "hatch.image-manifest";

/// Largest image manifest read back (a 64 GiB disk's chunk list is ~4 MiB).
pub const MAX_IMAGE_MANIFEST_BYTES: u64 = 16 << 20;
/// Largest kernel or initrd accepted from a manifest.
const MAX_BOOT_FILE: u64 = 1 << 30;
/// Largest base disk accepted from a manifest.
const MAX_DISK: u64 = 1 << 40;
/// Longest kernel command line (the image crate's limit).
const MAX_CMDLINE: usize = 1024;

/// Key of an image manifest: by name, then by import (a name deleted and
/// imported again gets a new key, so no node reads a mix of the two).
pub fn image_manifest_key(name: &str, id: &str) -> String {
    format!("images/{name}/{id}.json")
}

/// Where image manifests live (garbage collection reads them all).
pub const IMAGE_MANIFESTS_PREFIX: &str = "images/";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageManifest {
    pub version: u32,
    pub name: String,
    pub id: String,
    pub created_at: String,
    /// `raw` or `qcow2` (of `disk`).
    pub disk_format: String,
    pub disk_mib: u64,
    pub cmdline: String,
    pub agent: bool,
    pub app: Option<AppConfig>,
    pub kernel: FileChunks,
    pub initrd: FileChunks,
    pub disk: FileChunks,
}

impl ImageManifest {
    pub fn encode(&self, keys: &SealKeys) -> Result<Vec<u8>, serde_json::Error> {
        envelope::seal(FORMAT, IMAGE_MANIFEST_VERSION, self, keys)
    }

    /// Parse, authenticate and validate the manifest of image `name`
    /// import `id` (what the cluster's database says it is).
    pub fn decode(
        bytes: &[u8],
        keys: &SealKeys,
        name: &str,
        id: &str,
    ) -> Result<ImageManifest, ManifestError> {
        let body = envelope::open(bytes, FORMAT, IMAGE_MANIFEST_VERSION, keys)?;
        let m: ImageManifest = serde_json::from_str(body.get())
            .map_err(|e| ManifestError::Malformed(e.to_string()))?;
        m.validate(name, id).map_err(ManifestError::Invalid)?;
        Ok(m)
    }

    fn validate(&self, name: &str, id: &str) -> Result<(), String> {
        if self.version != IMAGE_MANIFEST_VERSION {
            return Err(format!("version {}", self.version));
        }
        if self.name != name || hatch_image::validate_image_name(&self.name).is_err() {
            return Err(format!("image name {:?} (expected {name})", self.name));
        }
        if self.id != id || !is_image_id(&self.id) {
            return Err(format!("image id {:?} (expected {id})", self.id));
        }
        if humantime::parse_rfc3339(&self.created_at).is_err() {
            return Err(format!("creation time {:?}", self.created_at));
        }
        hatch_image::disk_file_name(&self.disk_format).map_err(|e| e.to_string())?;
        if self.cmdline.len() > MAX_CMDLINE || self.cmdline.chars().any(char::is_control) {
            return Err("kernel command line".into());
        }
        for (what, file, max) in [
            ("kernel", &self.kernel, MAX_BOOT_FILE),
            ("initrd", &self.initrd, MAX_BOOT_FILE),
            ("disk", &self.disk, MAX_DISK),
        ] {
            file.validate(max).map_err(|r| format!("{what}: {r}"))?;
            if file.len == 0 {
                return Err(format!("{what}: empty"));
            }
        }
        // A raw disk is exactly its size; a qcow2 one at most that plus
        // its metadata.
        let size = self.disk_mib.saturating_mul(1 << 20);
        let fits = match self.disk_format.as_str() {
            "raw" => self.disk.len == size,
            _ => self.disk.len <= size.saturating_mul(2).saturating_add(64 << 20),
        };
        if !fits || self.disk_mib == 0 {
            return Err(format!(
                "a {} disk of {} bytes for {} MiB",
                self.disk_format, self.disk.len, self.disk_mib
            ));
        }
        Ok(())
    }

    /// The chunk ids an image manifest references, for garbage collection,
    /// without authenticating it.
    pub fn chunk_refs(bytes: &[u8]) -> Result<Vec<String>, String> {
        let (format, m) = envelope::unverified(bytes)?;
        if format != FORMAT {
            return Err(format!("format {format:?} among image manifests"));
        }
        envelope::chunk_ids([&m["kernel"], &m["initrd"], &m["disk"]])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(len: u64, seed: u64) -> FileChunks {
        let n = FileChunks::count(len, hatch_chunks::CHUNK_SIZE) as usize;
        FileChunks {
            len,
            chunk_size: hatch_chunks::CHUNK_SIZE,
            chunks: (0..n)
                .map(|i| (i % 3 != 1).then(|| format!("{:064x}", seed + i as u64)))
                .collect(),
        }
    }

    fn sample() -> ImageManifest {
        ImageManifest {
            version: IMAGE_MANIFEST_VERSION,
            name: "web".into(),
            id: "img-abcdefghijkl".into(),
            created_at: "2026-12-02T10:00:00Z".into(),
            disk_format: "raw".into(),
            disk_mib: 3,
            cmdline: "console=ttyS0".into(),
            agent: true,
            app: Some(AppConfig {
                entrypoint: vec!["/app".into()],
                exposed_ports: vec![8000],
                ..AppConfig::default()
            }),
            kernel: chunks(5 << 20, 100),
            initrd: chunks(1 << 20, 200),
            disk: chunks(3 << 20, 300),
        }
    }

    fn keys() -> SealKeys {
        SealKeys::new(b"image-manifest-test-key", &[])
    }

    #[test]
    fn round_trip_and_chunk_refs() {
        let m = sample();
        let bytes = m.encode(&keys()).unwrap();
        assert_eq!(
            ImageManifest::decode(&bytes, &keys(), "web", "img-abcdefghijkl").unwrap(),
            m
        );
        let mut want: Vec<String> = [&m.kernel, &m.initrd, &m.disk]
            .iter()
            .flat_map(|f| f.ids().map(String::from).collect::<Vec<_>>())
            .collect();
        let mut got = ImageManifest::chunk_refs(&bytes).unwrap();
        want.sort();
        got.sort();
        assert_eq!(got, want);
        assert!(ImageManifest::chunk_refs(b"{}").is_err());
    }

    #[test]
    fn forged_foreign_and_malformed_manifests_are_refused() {
        let bytes = sample().encode(&keys()).unwrap();
        let other_keys = SealKeys::new(b"another-cluster-key", &[]);
        assert!(matches!(
            ImageManifest::decode(&bytes, &other_keys, "web", "img-abcdefghijkl"),
            Err(ManifestError::Unauthentic(_))
        ));
        // Another image's or another import's manifest under this name.
        for (name, id) in [("api", "img-abcdefghijkl"), ("web", "img-zzzzzzzzzzzz")] {
            assert!(matches!(
                ImageManifest::decode(&bytes, &keys(), name, id),
                Err(ManifestError::Invalid(_))
            ));
        }
        // Body changed after sealing.
        let text = String::from_utf8(bytes.clone()).unwrap();
        let tampered = text.replace("console=ttyS0", "console=ttyS1");
        assert!(
            ImageManifest::decode(tampered.as_bytes(), &keys(), "web", "img-abcdefghijkl").is_err()
        );
        assert!(matches!(
            ImageManifest::decode(b"not json", &keys(), "web", "img-abcdefghijkl"),
            Err(ManifestError::Malformed(_))
        ));

        // Sealed with the right key but not a form Hatch writes.
        type Change = fn(&mut ImageManifest);
        let bad: Vec<(&str, Change)> = vec![
            ("format", |m| m.disk_format = "vmdk".into()),
            ("raw size", |m| m.disk.len -= 1),
            ("zero disk", |m| {
                m.disk_mib = 0;
                m.disk = chunks(0, 1);
            }),
            ("empty kernel", |m| m.kernel = chunks(0, 1)),
            ("chunk count", |m| {
                m.initrd.chunks.push(None);
            }),
            ("chunk id", |m| m.kernel.chunks[0] = Some("../../x".into())),
            ("cmdline", |m| m.cmdline = "a\nb".into()),
            ("time", |m| m.created_at = "yesterday".into()),
            ("version", |m| m.version = 7),
        ];
        for (what, change) in bad {
            let mut m = sample();
            change(&mut m);
            let bytes = m.encode(&keys()).unwrap();
            assert!(
                matches!(
                    ImageManifest::decode(&bytes, &keys(), "web", "img-abcdefghijkl"),
                    Err(ManifestError::Invalid(_))
                ),
                "{what}"
            );
        }
    }
}
