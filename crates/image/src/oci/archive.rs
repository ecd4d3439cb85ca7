//! The outer archive: extracted to a staging directory, then read as an
//! OCI image layout (`oci-layout`, `index.json`, `blobs/`) or as a
//! `docker save` archive (`manifest.json`). Every file named by the archive
//! is resolved inside the staging directory (no `..`, no symlink out of
//! it), every blob checked against its digest and size.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::config::AppConfig;
use super::invalid;
use crate::ImageError;

/// JSON documents (index, manifests, configs) larger than this are refused.
const MAX_JSON_BYTES: u64 = 8 << 20;
/// Nested indexes followed at most.
const MAX_INDEX_DEPTH: usize = 3;

/// How a layer's bytes are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Compression {
    None,
    Gzip,
    Zstd,
    /// Not declared (`docker save`): told by the first bytes.
    Sniff,
}

/// What a layer must hash to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Check {
    /// The file as stored (OCI: the descriptor's digest), checked before use.
    Stored { sha256: String, size: u64 },
    /// The uncompressed tar (`docker save`: the config's `diff_ids`).
    Uncompressed { sha256: String },
}

#[derive(Debug, Clone)]
pub(super) struct Layer {
    pub path: PathBuf,
    pub digest: String,
    pub compression: Compression,
    pub check: Check,
}

#[derive(Debug)]
pub(super) struct Image {
    pub layers: Vec<Layer>,
    pub app: AppConfig,
}

/// Extract the archive's regular files, directories and symlinks into
/// `dest` (symlinks are how `docker save` shares a layer between images).
pub(super) fn extract(archive: &Path, dest: &Path) -> Result<(), ImageError> {
    let file = File::open(archive)
        .map_err(|e| ImageError::io(format!("opening {}", archive.display()), e))?;
    fs::create_dir_all(dest)
        .map_err(|e| ImageError::io(format!("creating {}", dest.display()), e))?;
    let mut tar = tar::Archive::new(file);
    let bad = |e: io::Error| {
        invalid(format!(
            "{} is not a readable tar archive: {e}",
            archive.display()
        ))
    };
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        use tar::EntryType as T;
        if !matches!(
            entry.header().entry_type(),
            T::Regular | T::Directory | T::Symlink
        ) {
            continue;
        }
        let unpacked = entry.unpack_in(dest).map_err(bad)?;
        if !unpacked {
            return Err(invalid("the archive names a path outside itself"));
        }
    }
    Ok(())
}

/// Read the image `staged` holds: OCI layout first, else `docker save`.
pub(super) fn read_image(staged: &Path) -> Result<Image, ImageError> {
    if staged.join("index.json").is_file() {
        return read_oci(staged);
    }
    if staged.join("manifest.json").is_file() {
        return read_docker(staged);
    }
    Err(invalid(
        "not an OCI image archive (no index.json) nor a docker-save archive (no manifest.json)",
    ))
}

fn read_oci(staged: &Path) -> Result<Image, ImageError> {
    let index: ImageIndex = parse(
        &read_inside(staged, "index.json", MAX_JSON_BYTES)?,
        "index.json",
    )?;
    let mut seen = Vec::new();
    match find_manifest(staged, index.manifests(), 0, &mut seen)? {
        Some(image) => Ok(image),
        None if seen.is_empty() => Err(invalid("index.json lists no image manifest")),
        None => Err(invalid(format!(
            "the archive holds no linux/amd64 image (it has {})",
            seen.join(", ")
        ))),
    }
}

/// The first linux/amd64 image among `descriptors` (indexes followed);
/// `seen` collects the platforms passed over.
fn find_manifest(
    staged: &Path,
    descriptors: &[Descriptor],
    depth: usize,
    seen: &mut Vec<String>,
) -> Result<Option<Image>, ImageError> {
    for d in descriptors {
        if let Some(p) = d.platform()
            && !(p.os().to_string() == "linux" && p.architecture().to_string() == "amd64")
        {
            seen.push(format!("{}/{}", p.os(), p.architecture()));
            continue;
        }
        match d.media_type() {
            MediaType::ImageIndex => {
                if depth >= MAX_INDEX_DEPTH {
                    return Err(invalid("image indexes nested too deep"));
                }
                let bytes = read_blob(staged, d, MAX_JSON_BYTES)?;
                let nested: ImageIndex = parse(&bytes, "an image index")?;
                if let Some(image) = find_manifest(staged, nested.manifests(), depth + 1, seen)? {
                    return Ok(Some(image));
                }
            }
            MediaType::ImageManifest => {
                let bytes = read_blob(staged, d, MAX_JSON_BYTES)?;
                let manifest: ImageManifest = parse(&bytes, "the image manifest")?;
                let config_bytes = read_blob(staged, manifest.config(), MAX_JSON_BYTES)?;
                let config: ImageConfiguration = parse(&config_bytes, "the image config")?;
                if let Some(platform) = other_platform(&config) {
                    seen.push(platform);
                    continue;
                }
                let layers = manifest
                    .layers()
                    .iter()
                    .map(|l| oci_layer(staged, l))
                    .collect::<Result<Vec<_>, _>>()?;
                return Ok(Some(image(layers, &config)?));
            }
            other => seen.push(format!("a {other} entry")),
        }
    }
    Ok(None)
}

fn oci_layer(staged: &Path, d: &Descriptor) -> Result<Layer, ImageError> {
    let compression = match d.media_type() {
        MediaType::ImageLayer => Compression::None,
        MediaType::ImageLayerGzip => Compression::Gzip,
        MediaType::ImageLayerZstd => Compression::Zstd,
        MediaType::Other(t) if t == "application/vnd.docker.image.rootfs.diff.tar.gzip" => {
            Compression::Gzip
        }
        other => return Err(invalid(format!("unsupported layer media type {other}"))),
    };
    let (sha256, size) = sha256_of(d)?;
    Ok(Layer {
        path: blob_path(staged, &sha256)?,
        digest: format!("sha256:{sha256}"),
        compression,
        check: Check::Stored { sha256, size },
    })
}

#[derive(Deserialize)]
struct DockerManifest {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

fn read_docker(staged: &Path) -> Result<Image, ImageError> {
    let manifests: Vec<DockerManifest> = parse(
        &read_inside(staged, "manifest.json", MAX_JSON_BYTES)?,
        "manifest.json",
    )?;
    let [m] = manifests.as_slice() else {
        return Err(invalid(format!(
            "the archive holds {} images; save one image per archive",
            manifests.len()
        )));
    };
    let config_bytes = read_inside(staged, &m.config, MAX_JSON_BYTES)?;
    // The config is named by its digest: `<hex>.json` or `blobs/sha256/<hex>`.
    let named = Path::new(&m.config)
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.trim_end_matches(".json").to_string())
        .unwrap_or_default();
    if !is_sha256_hex(&named) || hex_sha256(&config_bytes) != named {
        return Err(invalid(format!(
            "the image config {} does not match its digest",
            m.config
        )));
    }
    let config: ImageConfiguration = parse(&config_bytes, "the image config")?;
    if let Some(platform) = other_platform(&config) {
        return Err(invalid(format!(
            "the archive holds no linux/amd64 image (it has {platform})"
        )));
    }
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != m.layers.len() {
        return Err(invalid(format!(
            "the image has {} layers but its config lists {} digests",
            m.layers.len(),
            diff_ids.len()
        )));
    }
    let layers = m
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(path, diff_id)| {
            let sha256 = diff_id
                .strip_prefix("sha256:")
                .filter(|h| is_sha256_hex(h))
                .ok_or_else(|| invalid(format!("unsupported layer digest {diff_id:?}")))?;
            Ok(Layer {
                path: inside(staged, path)?,
                digest: diff_id.clone(),
                compression: Compression::Sniff,
                check: Check::Uncompressed {
                    sha256: sha256.to_string(),
                },
            })
        })
        .collect::<Result<Vec<_>, ImageError>>()?;
    image(layers, &config)
}

fn image(layers: Vec<Layer>, config: &ImageConfiguration) -> Result<Image, ImageError> {
    if layers.is_empty() {
        return Err(invalid("the image has no layers"));
    }
    let app = AppConfig::from_image_config(config.config().as_ref())
        .map_err(|e| invalid(format!("image config: {e}")))?;
    Ok(Image { layers, app })
}

/// `os/architecture` of a config that is not linux/amd64.
fn other_platform(config: &ImageConfiguration) -> Option<String> {
    let (os, arch) = (config.os().to_string(), config.architecture().to_string());
    (os != "linux" || arch != "amd64").then(|| format!("{os}/{arch}"))
}

fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|e| invalid(format!("{what} is not valid: {e}")))
}

fn sha256_of(d: &Descriptor) -> Result<(String, u64), ImageError> {
    let digest = d.digest().to_string();
    match digest.split_once(':') {
        Some(("sha256", hex)) if is_sha256_hex(hex) => Ok((hex.to_string(), d.size())),
        _ => Err(invalid(format!(
            "unsupported digest {digest:?} (sha256 only)"
        ))),
    }
}

fn blob_path(staged: &Path, sha256: &str) -> Result<PathBuf, ImageError> {
    let path = inside(staged, &format!("blobs/sha256/{sha256}"))?;
    if !path.is_file() {
        return Err(invalid(format!(
            "blob sha256:{sha256} is missing from the archive"
        )));
    }
    Ok(path)
}

/// A blob's bytes (at most `max`), checked against its descriptor.
fn read_blob(staged: &Path, d: &Descriptor, max: u64) -> Result<Vec<u8>, ImageError> {
    let (sha256, size) = sha256_of(d)?;
    if size > max {
        return Err(invalid(format!(
            "blob sha256:{sha256} is too large ({size} bytes)"
        )));
    }
    let path = blob_path(staged, &sha256)?;
    let bytes = read_at_most(&path, max)?;
    if bytes.len() as u64 != size || hex_sha256(&bytes) != sha256 {
        return Err(invalid(format!(
            "blob sha256:{sha256} does not match its digest"
        )));
    }
    Ok(bytes)
}

/// Check a stored file against its digest and size, reading it once.
pub(super) fn verify_file(path: &Path, sha256: &str, size: u64) -> Result<(), ImageError> {
    let mut file =
        File::open(path).map_err(|e| ImageError::io(format!("opening {}", path.display()), e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let read = file
            .read(&mut buf)
            .map_err(|e| ImageError::io(format!("reading {}", path.display()), e))?;
        if read == 0 {
            break;
        }
        hasher.update(&buf[..read]);
        n += read as u64;
    }
    if n != size || hex(&hasher.finalize()) != sha256 {
        return Err(invalid(format!(
            "blob sha256:{sha256} does not match its digest"
        )));
    }
    Ok(())
}

fn read_inside(staged: &Path, rel: &str, max: u64) -> Result<Vec<u8>, ImageError> {
    let path = inside(staged, rel)?;
    read_at_most(&path, max)
}

fn read_at_most(path: &Path, max: u64) -> Result<Vec<u8>, ImageError> {
    let file = File::open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            invalid(format!("{} is missing from the archive", path.display()))
        } else {
            ImageError::io(format!("opening {}", path.display()), e)
        }
    })?;
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ImageError::io(format!("reading {}", path.display()), e))?;
    if bytes.len() as u64 > max {
        return Err(invalid(format!("{} is too large", path.display())));
    }
    Ok(bytes)
}

/// `rel` resolved inside `staged`: relative, no `..`, and after following
/// symlinks still below it.
fn inside(staged: &Path, rel: &str) -> Result<PathBuf, ImageError> {
    let p = Path::new(rel);
    if !p
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(invalid(format!(
            "the archive names {rel:?}, outside itself"
        )));
    }
    let root = fs::canonicalize(staged)
        .map_err(|e| ImageError::io(format!("resolving {}", staged.display()), e))?;
    match fs::canonicalize(root.join(p)) {
        Ok(real) if real.starts_with(&root) => Ok(real),
        Ok(_) => Err(invalid(format!("{rel} links outside the archive"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(invalid(format!("{rel} is missing from the archive")))
        }
        Err(e) => Err(ImageError::io(format!("resolving {rel}"), e)),
    }
}

pub(super) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub(super) fn hex_sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
