//! Applying one layer to the root file system, as the OCI image spec's
//! changesets say: first the layer's whiteouts remove what lower layers
//! put there (`.wh.NAME` removes NAME, `.wh..wh..opq` empties its
//! directory), then its entries are written. A whiteout applies only to
//! lower layers, hence the two passes. Paths never leave the root: the tar
//! crate refuses entries that would, and whiteouts never follow a symlink.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use super::archive::{Check, Compression, Layer, hex, verify_file};
use super::invalid;
use crate::ImageError;

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

pub(super) fn apply(layer: &Layer, rootfs: &Path) -> Result<(), ImageError> {
    if let Check::Stored { sha256, size } = &layer.check {
        verify_file(&layer.path, sha256, *size)?;
    }
    let bad = |e: io::Error| {
        invalid(format!(
            "layer {} cannot be applied: {}",
            layer.digest,
            chain(&e)
        ))
    };

    // Pass 1: whiteouts; the whole stream is read, for the digest check.
    let mut hashing = Hashing {
        inner: open(layer)?,
        hasher: Sha256::new(),
    };
    {
        let mut tar = tar::Archive::new(&mut hashing);
        for entry in tar.entries().map_err(bad)? {
            let entry = entry.map_err(bad)?;
            let path = entry.path().map_err(bad)?.into_owned();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let parent = path.parent().unwrap_or(Path::new(""));
            if name == OPAQUE {
                empty_dir(rootfs, parent)?;
            } else if let Some(hidden) = name.strip_prefix(WHITEOUT) {
                remove(rootfs, &parent.join(hidden))?;
            }
        }
    }
    io::copy(&mut hashing, &mut io::sink()).map_err(bad)?;
    if let Check::Uncompressed { sha256 } = &layer.check
        && hex(&hashing.hasher.finalize()) != *sha256
    {
        return Err(invalid(format!(
            "layer {} does not match its digest",
            layer.digest
        )));
    }

    // Pass 2: the entries.
    let mut tar = tar::Archive::new(open(layer)?);
    tar.set_preserve_permissions(true);
    tar.set_preserve_mtime(true);
    tar.set_unpack_xattrs(false);
    tar.set_overwrite(true);
    // Owners are kept when this process may set them (the daemon runs as
    // root); otherwise the files become this user's.
    // SAFETY: geteuid has no preconditions and cannot fail.
    tar.set_preserve_ownerships(unsafe { libc::geteuid() } == 0);
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        use tar::EntryType as T;
        match entry.header().entry_type() {
            T::Regular | T::Continuous | T::Directory | T::Symlink | T::Link | T::GNUSparse => {}
            // Devices and FIFOs: a VM gets its /dev from the kernel.
            _ => continue,
        }
        let path = entry.path().map_err(bad)?.into_owned();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(WHITEOUT))
        {
            continue;
        }
        if !entry.unpack_in(rootfs).map_err(bad)? {
            return Err(invalid(format!(
                "layer {} names {}, outside the root",
                layer.digest,
                path.display()
            )));
        }
    }
    Ok(())
}

/// An error and its causes (the tar crate wraps the one that matters).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The layer's tar stream, decompressed.
fn open(layer: &Layer) -> Result<Box<dyn Read>, ImageError> {
    let file = File::open(&layer.path)
        .map_err(|e| ImageError::io(format!("opening layer {}", layer.digest), e))?;
    let mut reader = BufReader::new(file);
    let compression = match layer.compression {
        Compression::Sniff => {
            let head = reader
                .fill_buf()
                .map_err(|e| ImageError::io(format!("reading layer {}", layer.digest), e))?;
            if head.starts_with(&[0x1f, 0x8b]) {
                Compression::Gzip
            } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                Compression::Zstd
            } else {
                Compression::None
            }
        }
        c => c,
    };
    Ok(match compression {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(reader)
                .map_err(|e| ImageError::io(format!("reading layer {}", layer.digest), e))?,
        ),
        Compression::None | Compression::Sniff => Box::new(reader),
    })
}

struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// `rel` below `rootfs` when every directory on the way is a real one
/// (None: something on the way does not exist, so nothing is there).
fn resolve(rootfs: &Path, rel: &Path) -> Result<Option<PathBuf>, ImageError> {
    let mut path = rootfs.to_path_buf();
    let parts: Vec<_> = rel
        .components()
        .filter(|c| !matches!(c, Component::RootDir | Component::CurDir))
        .collect();
    for (i, c) in parts.iter().enumerate() {
        let Component::Normal(name) = c else {
            return Err(invalid(format!(
                "a whiteout names {}, outside the root",
                rel.display()
            )));
        };
        path.push(name);
        let last = i + 1 == parts.len();
        match fs::symlink_metadata(&path) {
            Ok(m) if !last && m.file_type().is_symlink() => {
                return Err(invalid(format!(
                    "a whiteout for {} goes through a symlink",
                    rel.display()
                )));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ImageError::io(format!("reading {}", path.display()), e)),
        }
    }
    Ok(Some(path))
}

fn remove(rootfs: &Path, rel: &Path) -> Result<(), ImageError> {
    let Some(path) = resolve(rootfs, rel)? else {
        return Ok(());
    };
    if path == rootfs {
        return Err(invalid("a whiteout names the root"));
    }
    let meta = fs::symlink_metadata(&path)
        .map_err(|e| ImageError::io(format!("reading {}", path.display()), e))?;
    let removed = if meta.is_dir() {
        fs::remove_dir_all(&path)
    } else {
        fs::remove_file(&path)
    };
    removed.map_err(|e| ImageError::io(format!("removing {}", path.display()), e))
}

fn empty_dir(rootfs: &Path, rel: &Path) -> Result<(), ImageError> {
    let Some(dir) = resolve(rootfs, rel)? else {
        return Ok(());
    };
    if fs::symlink_metadata(&dir).is_ok_and(|m| !m.is_dir()) {
        return Ok(());
    }
    let entries =
        fs::read_dir(&dir).map_err(|e| ImageError::io(format!("reading {}", dir.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| ImageError::io(format!("reading {}", dir.display()), e))?;
        let rel = rel.join(entry.file_name());
        remove(rootfs, &rel)?;
    }
    Ok(())
}

/// Bytes of the regular files below `dir` (symlinks not followed).
pub(super) fn disk_usage(dir: &Path) -> Result<u64, ImageError> {
    let mut total = 0;
    let entries =
        fs::read_dir(dir).map_err(|e| ImageError::io(format!("reading {}", dir.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| ImageError::io(format!("reading {}", dir.display()), e))?;
        let meta = entry
            .metadata()
            .map_err(|e| ImageError::io(format!("reading {}", entry.path().display()), e))?;
        if meta.is_dir() {
            total += disk_usage(&entry.path())?;
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}
