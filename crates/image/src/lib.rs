//! Guest images: build the default image, register user images.
//!
//! An image is a directory `<root>/<name>/` holding a kernel, an initrd, a base disk and
//! `image.json` (the serialized [`Image`]). VMs never write to the base disk: the VMM creates
//! a qcow2 overlay on top of it, so base disks are treated as immutable (see
//! [`build_default`] for how the default image keeps that promise across rebuilds).

mod build;
mod bzimage;
mod elf;
mod initramfs;
mod kernel;
pub mod oci;
mod ram_copy;
mod util;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use build::{BuildOptions, DEFAULT_CMDLINE, build_default};
/// Sparse file copy (holes stay holes), also used for guest RAM files.
pub use ram_copy::PreparedCopy;
pub use util::{copy_sparse, copy_sparse_unsynced};

/// File name of an image's metadata inside its directory.
pub const IMAGE_JSON: &str = "image.json";

/// Everything that can go wrong while building, registering or reading images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image not found: {0}")]
    NotFound(String),
    #[error("image already exists: {0}")]
    AlreadyExists(String),
    #[error(
        "invalid image name {0:?}: use 1-63 characters of [a-z0-9-], starting with a letter or digit"
    )]
    InvalidName(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("unsupported disk {path}: {reason}")]
    UnsupportedDisk { path: PathBuf, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{context}: {source}")]
    Json {
        context: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("command `{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("kernel: {0}")]
    Kernel(String),
}

impl ImageError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        ImageError::Io {
            context: context.into(),
            source,
        }
    }
}

/// A bootable guest image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub name: String,
    /// Absolute path of the kernel (bzImage).
    pub kernel: PathBuf,
    /// Absolute path of the initrd.
    pub initrd: PathBuf,
    /// Absolute path of the base disk; VMs get a qcow2 overlay on top of it.
    pub disk: PathBuf,
    /// `"raw"` or `"qcow2"`.
    pub disk_format: String,
    /// Virtual size of the base disk in MiB (rounded up).
    pub disk_mib: u64,
    /// Kernel arguments the image needs (the VMM appends `tsc_early_khz=` and its own params).
    pub cmdline: String,
    /// RFC 3339 UTC time of creation.
    pub created_at: String,
    /// Whether the guest runs Hatch's agent (clock and RNG after a restore).
    /// Restores of images without it are not synced (images registered by
    /// users unless they say otherwise).
    #[serde(default)]
    pub agent: bool,
    /// The app an imported container image runs ([`ImageStore::import`]);
    /// None for images that boot their own userland.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<oci::AppConfig>,
    /// Which import this is (`img-…`): an imported image is known to the
    /// cluster by name and id, and a copy on a node whose id differs from
    /// the cluster's record is stale. None for built and registered images,
    /// which exist on one node only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Checks an image name: `[a-z0-9][a-z0-9-]{0,62}`.
pub fn validate_image_name(name: &str) -> Result<(), ImageError> {
    let b = name.as_bytes();
    let ok = (1..=63).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
    if ok {
        Ok(())
    } else {
        Err(ImageError::InvalidName(name.to_string()))
    }
}

/// A directory of images.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

/// Default kernel command line of registered images when none is given.
pub const DEFAULT_USER_CMDLINE: &str = "console=ttyS0 root=/dev/vda rw panic=-1";

impl ImageStore {
    /// Opens (creating if needed) the store rooted at `root`. The path is made absolute so
    /// that image paths do not depend on the working directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let root = root.into();
        fs::create_dir_all(&root)
            .map_err(|e| ImageError::io(format!("creating image store {}", root.display()), e))?;
        let root = std::path::absolute(&root)
            .map_err(|e| ImageError::io(format!("resolving image store {}", root.display()), e))?;
        Ok(ImageStore { root })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of image `name` (which need not exist).
    pub(crate) fn image_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Reads image `name`.
    pub fn get(&self, name: &str) -> Result<Image, ImageError> {
        if validate_image_name(name).is_err() {
            return Err(ImageError::NotFound(name.to_string()));
        }
        let path = self.image_dir(name).join(IMAGE_JSON);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ImageError::NotFound(name.to_string()));
            }
            Err(e) => return Err(ImageError::io(format!("reading {}", path.display()), e)),
        };
        serde_json::from_str(&text).map_err(|e| ImageError::Json {
            context: format!("parsing {}", path.display()),
            source: e,
        })
    }

    /// All images, sorted by name. Directories without a readable `image.json` (builds in
    /// progress, leftovers) are skipped with a warning.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        let rd = fs::read_dir(&self.root)
            .map_err(|e| ImageError::io(format!("listing {}", self.root.display()), e))?;
        let mut images = Vec::new();
        for entry in rd {
            let entry =
                entry.map_err(|e| ImageError::io(format!("listing {}", self.root.display()), e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if validate_image_name(&name).is_err() || !entry.path().join(IMAGE_JSON).exists() {
                continue;
            }
            match self.get(&name) {
                Ok(img) => images.push(img),
                Err(e) => tracing::warn!(image = %name, error = %e, "skipping unreadable image"),
            }
        }
        images.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(images)
    }

    /// Imports a container image (OCI image layout or `docker save`
    /// archive, see [`oci`]) as image `name`: its layers become an ext4 root
    /// disk holding the app's config at `/.hatch/app.json`; it boots with
    /// `base`'s kernel and initramfs, whose init runs the app. The image
    /// appears atomically; on any error nothing is left.
    pub fn import(
        &self,
        name: &str,
        id: &str,
        archive: &Path,
        base: &Image,
    ) -> Result<Image, ImageError> {
        validate_image_name(name)?;
        let dest = self.image_dir(name);
        if dest.exists() {
            return Err(ImageError::AlreadyExists(name.to_string()));
        }
        let staging = util::TempDir::new_in(&self.root, &format!("import-{name}"))?;
        let work = staging.path().join("work");
        let unpacked = oci::unpack(archive, &work)?;
        let hatch_dir = unpacked.rootfs.join(".hatch");
        fs::create_dir_all(&hatch_dir)
            .map_err(|e| ImageError::io(format!("creating {}", hatch_dir.display()), e))?;
        let app_json = serde_json::to_vec_pretty(&unpacked.app).map_err(|e| ImageError::Json {
            context: "serializing the app config".into(),
            source: e,
        })?;
        fs::write(hatch_dir.join("app.json"), app_json)
            .map_err(|e| ImageError::io("writing .hatch/app.json", e))?;
        // Room for the files, their metadata and the journal; the guest
        // grows the file system when a VM asks for a larger disk.
        let disk_mib = (unpacked.bytes + unpacked.bytes / 4).div_ceil(1 << 20) + 128;
        let disk = staging.path().join("disk.raw");
        util::run(
            std::process::Command::new("mkfs.ext4")
                .args(["-q", "-F", "-T", "default", "-b", "4096", "-m", "0"])
                .args(["-L", "hatch-app", "-E", "root_owner=0:0"])
                .arg("-d")
                .arg(&unpacked.rootfs)
                .arg(&disk)
                .arg(format!("{disk_mib}M")),
        )?;
        fs::remove_dir_all(&work)
            .map_err(|e| ImageError::io(format!("removing {}", work.display()), e))?;
        util::copy_sparse(&base.kernel, &staging.path().join("vmlinuz"))?;
        util::copy_sparse(&base.initrd, &staging.path().join("initrd.img"))?;
        let image = Image {
            name: name.to_string(),
            kernel: dest.join("vmlinuz"),
            initrd: dest.join("initrd.img"),
            disk: dest.join("disk.raw"),
            disk_format: "raw".into(),
            disk_mib,
            cmdline: base.cmdline.clone(),
            created_at: util::now_rfc3339(),
            agent: true,
            app: Some(unpacked.app),
            id: Some(id.to_string()),
        };
        write_image_json(staging.path(), &image)?;
        util::fsync_dir(staging.path())?;
        match fs::rename(staging.path(), &dest) {
            Ok(()) => staging.disarm(),
            Err(_) if dest.exists() => return Err(ImageError::AlreadyExists(name.to_string())),
            Err(e) => {
                return Err(ImageError::io(
                    format!("moving image into place at {}", dest.display()),
                    e,
                ));
            }
        }
        util::fsync_dir(&self.root)?;
        tracing::info!(image = %name, layers = unpacked.layers.len(), disk_mib, "imported image");
        Ok(image)
    }

    /// Registers a user image: copies `kernel`, `initrd` and `disk` (raw or qcow2 without a
    /// backing file) under `<root>/<name>/` and writes `image.json`. Sparse files stay sparse.
    /// The image appears atomically (staged in a hidden directory, then renamed).
    pub fn register(
        &self,
        name: &str,
        kernel: &Path,
        initrd: &Path,
        disk: &Path,
        cmdline: Option<&str>,
        agent: bool,
    ) -> Result<Image, ImageError> {
        validate_image_name(name)?;
        let cmdline = cmdline.unwrap_or(DEFAULT_USER_CMDLINE).trim().to_string();
        validate_cmdline(&cmdline)?;
        let dest = self.image_dir(name);
        if dest.exists() {
            return Err(ImageError::AlreadyExists(name.to_string()));
        }
        util::check_kernel_file(kernel)?;
        util::check_regular_nonempty(initrd, "initrd")?;
        let info = util::disk_info(disk)?;

        let staging = util::TempDir::new_in(&self.root, &format!("register-{name}"))?;
        let disk_file = format!("disk.{}", info.format);
        util::copy_sparse(kernel, &staging.path().join("vmlinuz"))?;
        util::copy_sparse(initrd, &staging.path().join("initrd.img"))?;
        util::copy_sparse(disk, &staging.path().join(&disk_file))?;
        let image = Image {
            name: name.to_string(),
            kernel: dest.join("vmlinuz"),
            initrd: dest.join("initrd.img"),
            disk: dest.join(&disk_file),
            disk_format: info.format,
            disk_mib: info.virtual_size.div_ceil(1 << 20),
            cmdline,
            created_at: util::now_rfc3339(),
            agent,
            app: None,
            id: None,
        };
        write_image_json(staging.path(), &image)?;
        util::fsync_dir(staging.path())?;
        match fs::rename(staging.path(), &dest) {
            Ok(()) => staging.disarm(),
            Err(e) if dest.exists() => {
                tracing::debug!(error = %e, "lost a register race");
                return Err(ImageError::AlreadyExists(name.to_string()));
            }
            Err(e) => {
                return Err(ImageError::io(
                    format!("moving image into place at {}", dest.display()),
                    e,
                ));
            }
        }
        util::fsync_dir(&self.root)?;
        tracing::info!(image = %name, format = %image.disk_format, disk_mib = image.disk_mib, "registered image");
        Ok(image)
    }
}

impl ImageStore {
    /// Start receiving image `name` from elsewhere (another node's import,
    /// through S3): its files are written into the staged directory, then
    /// [`ImageStore::install`] puts it in place.
    pub fn stage(&self, name: &str) -> Result<StagedImage, ImageError> {
        validate_image_name(name)?;
        Ok(StagedImage {
            dir: util::TempDir::new_in(&self.root, &format!("fetch-{name}"))?,
        })
    }

    /// Put a staged image in place under `image.name`, described by
    /// `image` (its paths are set here), replacing a copy of the same name
    /// (a stale one: the caller checked it is not the image wanted). The
    /// files are made durable first: an installed image is trusted by id.
    pub fn install(&self, staged: StagedImage, mut image: Image) -> Result<Image, ImageError> {
        validate_image_name(&image.name)?;
        let disk_file = disk_file_name(&image.disk_format)?;
        let dir = staged.dir.path();
        for file in [KERNEL_FILE, INITRD_FILE, disk_file.as_str()] {
            let path = dir.join(file);
            fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| ImageError::io(format!("syncing {}", path.display()), e))?;
        }
        let dest = self.image_dir(&image.name);
        image.kernel = dest.join(KERNEL_FILE);
        image.initrd = dest.join(INITRD_FILE);
        image.disk = dest.join(&disk_file);
        write_image_json(dir, &image)?;
        util::fsync_dir(dir)?;
        if dest.exists() {
            self.remove(&image.name)?;
        }
        fs::rename(dir, &dest).map_err(|e| {
            ImageError::io(format!("moving image into place at {}", dest.display()), e)
        })?;
        staged.dir.disarm();
        util::fsync_dir(&self.root)?;
        Ok(image)
    }

    /// Remove image `name`'s directory (moved aside first, so that no
    /// half-removed image is ever read); Ok if there is none.
    pub fn remove(&self, name: &str) -> Result<(), ImageError> {
        validate_image_name(name)?;
        let dir = self.image_dir(name);
        let aside = util::tmp_sibling(&self.root.join(format!("removed-{name}")));
        match fs::rename(&dir, &aside) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(ImageError::io(format!("removing {}", dir.display()), e)),
        }
        fs::remove_dir_all(&aside)
            .map_err(|e| ImageError::io(format!("removing {}", aside.display()), e))
    }
}

/// File names inside an image directory.
pub const KERNEL_FILE: &str = "vmlinuz";
pub const INITRD_FILE: &str = "initrd.img";

/// The base disk's file name for a disk format (`disk.raw`, `disk.qcow2`).
pub fn disk_file_name(format: &str) -> Result<String, ImageError> {
    match format {
        "raw" | "qcow2" => Ok(format!("disk.{format}")),
        other => Err(ImageError::InvalidInput(format!(
            "disk format {other:?} (raw or qcow2 expected)"
        ))),
    }
}

/// An image being received: a hidden directory removed unless installed.
pub struct StagedImage {
    dir: util::TempDir,
}

impl StagedImage {
    /// Where the file named `file` ([`KERNEL_FILE`], [`INITRD_FILE`],
    /// [`disk_file_name`]) is to be written.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
}

/// Kernel command lines are at most 2048 bytes on x86 and must be one line of printable text.
fn validate_cmdline(cmdline: &str) -> Result<(), ImageError> {
    if cmdline.len() > 1024 {
        return Err(ImageError::InvalidInput(
            "kernel command line longer than 1024 bytes".to_string(),
        ));
    }
    if cmdline.chars().any(|c| c.is_control()) {
        return Err(ImageError::InvalidInput(
            "kernel command line contains control characters".to_string(),
        ));
    }
    Ok(())
}

/// Writes `<dir>/image.json` atomically.
pub(crate) fn write_image_json(dir: &Path, image: &Image) -> Result<(), ImageError> {
    let json = serde_json::to_vec_pretty(image).map_err(|e| ImageError::Json {
        context: format!("serializing image {}", image.name),
        source: e,
    })?;
    util::write_atomic(&dir.join(IMAGE_JSON), &json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names() {
        for ok in ["default", "a", "0", "my-image-2", &"a".repeat(63)] {
            assert!(validate_image_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "A",
            "a_b",
            "a.b",
            "a/b",
            "..",
            " a",
            "é",
            &"a".repeat(64),
        ] {
            assert!(
                matches!(validate_image_name(bad), Err(ImageError::InvalidName(_))),
                "{bad}"
            );
        }
    }

    fn sample(root: &Path) -> Image {
        Image {
            name: "default".into(),
            kernel: root.join("default/vmlinuz"),
            initrd: root.join("default/initrd.img"),
            disk: root.join("default/base.raw"),
            disk_format: "raw".into(),
            disk_mib: 1024,
            cmdline: "console=ttyS0 quiet panic=-1".into(),
            created_at: "2024-01-02T03:04:05Z".into(),
            agent: false,
            app: None,
            id: None,
        }
    }

    #[test]
    fn image_json_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path().join("images")).unwrap();
        let img = sample(store.root());
        let dir = store.root().join("default");
        fs::create_dir_all(&dir).unwrap();
        write_image_json(&dir, &img).unwrap();
        assert_eq!(store.get("default").unwrap(), img);
        assert_eq!(store.list().unwrap(), vec![img.clone()]);
        // The JSON uses the documented field names.
        let v: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join(IMAGE_JSON)).unwrap()).unwrap();
        for k in [
            "name",
            "kernel",
            "initrd",
            "disk",
            "disk_format",
            "disk_mib",
            "cmdline",
            "created_at",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
        assert!(matches!(store.get("nope"), Err(ImageError::NotFound(_))));
        assert!(matches!(store.get("../x"), Err(ImageError::NotFound(_))));
    }

    #[test]
    fn a_staged_image_replaces_a_stale_copy_whole_or_not_at_all() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path().join("images")).unwrap();
        let write = |staged: &StagedImage, disk: &[u8]| {
            fs::write(staged.path(KERNEL_FILE), b"k").unwrap();
            fs::write(staged.path(INITRD_FILE), b"i").unwrap();
            fs::write(staged.path("disk.raw"), disk).unwrap();
        };
        let mut img = sample(store.root());
        img.name = "web".into();
        img.id = Some("img-old".into());
        let staged = store.stage("web").unwrap();
        write(&staged, b"old");
        let old = store.install(staged, img.clone()).unwrap();
        assert_eq!(store.get("web").unwrap(), old);
        assert_eq!(old.disk, store.root().join("web/disk.raw"));
        assert_eq!(fs::read(&old.disk).unwrap(), b"old");

        img.id = Some("img-new".into());
        let staged = store.stage("web").unwrap();
        write(&staged, b"new");
        let new = store.install(staged, img.clone()).unwrap();
        assert_eq!(store.get("web").unwrap().id.as_deref(), Some("img-new"));
        assert_eq!(fs::read(&new.disk).unwrap(), b"new");

        // A staged image dropped before install leaves nothing behind, and
        // a bad disk format is refused before anything moves.
        let staged = store.stage("other").unwrap();
        write(&staged, b"x");
        drop(staged);
        let staged = store.stage("web").unwrap();
        write(&staged, b"x");
        img.disk_format = "vmdk".into();
        assert!(matches!(
            store.install(staged, img),
            Err(ImageError::InvalidInput(_))
        ));
        let names: Vec<String> = fs::read_dir(store.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["web"]);
        store.remove("web").unwrap();
        store.remove("web").unwrap();
        assert!(matches!(store.get("web"), Err(ImageError::NotFound(_))));
    }

    #[test]
    fn list_skips_junk() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path()).unwrap();
        fs::create_dir_all(store.root().join(".staging-x")).unwrap();
        fs::create_dir_all(store.root().join("empty")).unwrap();
        let bad = store.root().join("bad");
        fs::create_dir_all(&bad).unwrap();
        fs::write(bad.join(IMAGE_JSON), b"{").unwrap();
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn register_raw_and_qcow2_header() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path().join("images")).unwrap();
        let kernel = tmp.path().join("k");
        let mut k = vec![0u8; 1024];
        k[0x202..0x206].copy_from_slice(b"HdrS");
        fs::write(&kernel, &k).unwrap();
        let initrd = tmp.path().join("i");
        fs::write(&initrd, b"070701").unwrap();
        let disk = tmp.path().join("d.raw");
        let f = fs::File::create(&disk).unwrap();
        f.set_len(3 << 20).unwrap();
        drop(f);
        let img = store
            .register(
                "user-1",
                &kernel,
                &initrd,
                &disk,
                Some("console=ttyS0"),
                false,
            )
            .unwrap();
        assert_eq!(img.disk_format, "raw");
        assert_eq!(img.disk_mib, 3);
        assert_eq!(img.cmdline, "console=ttyS0");
        assert!(img.disk.starts_with(store.root()));
        assert_eq!(fs::metadata(&img.disk).unwrap().len(), 3 << 20);
        assert_eq!(store.get("user-1").unwrap(), img);
        assert!(matches!(
            store.register("user-1", &kernel, &initrd, &disk, None, false),
            Err(ImageError::AlreadyExists(_))
        ));
        assert!(matches!(
            store.register("Bad", &kernel, &initrd, &disk, None, false),
            Err(ImageError::InvalidName(_))
        ));
        // Not a kernel.
        assert!(matches!(
            store.register("user-2", &initrd, &initrd, &disk, None, false),
            Err(ImageError::InvalidInput(_))
        ));
        assert!(store.get("user-2").is_err());
    }
}
