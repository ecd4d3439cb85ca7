//! Building the default image: Debian cloud kernel + busybox initramfs + `hatch-guest` +
//! an empty ext4 data disk.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::initramfs::{self, InitramfsSpec};
use crate::kernel::{self, ModuleIndex};
use crate::util::{self, Fnv};
use crate::{Image, ImageError, ImageStore, bzimage, elf, validate_image_name, write_image_json};

/// Kernel arguments of the default image. The VMM appends `tsc_early_khz=` (needed under TCG)
/// and its own `hatch.*` parameters.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet panic=-1 cryptomgr.notests";

/// Bump when the image layout or build recipe changes, to force rebuilds (changes to the
/// `/init` template are detected through its hash).
const BUILD_FORMAT: u32 = 3;
/// Bump when the base disk recipe changes (gives the disk a new file name; see below).
const DISK_FORMAT: u32 = 1;

/// File recording the inputs of a built image, next to `image.json`.
const BUILD_JSON: &str = "build.json";

/// Fixed identifiers so the base disk is byte-for-byte reproducible.
const DISK_UUID: &str = "8f4c2a1e-5b7d-4e39-9a6f-0c3d2b1a7e01";
const DISK_HASH_SEED: &str = "8f4c2a1e-5b7d-4e39-9a6f-0c3d2b1a7e02";
const DISK_EPOCH: u64 = 1_700_000_000;
const DISK_LABEL: &str = "hatch-data";

/// Environment variable naming the static busybox to use.
pub const ENV_BUSYBOX: &str = "HATCH_BUSYBOX";

/// Inputs of [`build_default`].
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Image name, normally `"default"`.
    pub name: String,
    /// Cache for the kernel `.deb` (`<cache>/debs`) and its unpacked tree (`<cache>/kernels`),
    /// e.g. `~/.cache/hatch`.
    pub cache_dir: PathBuf,
    /// The statically linked `hatch-guest` binary.
    pub guest_bin: PathBuf,
    /// Size of the base data disk in MiB (default 1024).
    pub disk_mib: u64,
    /// Rebuild kernel and initramfs even when the inputs are unchanged.
    pub force: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            name: "default".into(),
            cache_dir: PathBuf::from(".cache/hatch"),
            guest_bin: PathBuf::from("hatch-guest"),
            disk_mib: 1024,
            force: false,
        }
    }
}

/// What an image was built from; a rebuild is skipped when it is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Fingerprint {
    format: u32,
    kernel_deb: String,
    kernel_deb_size: u64,
    guest_hash: String,
    busybox_hash: String,
    /// Hash of the `/init` template, so script changes rebuild the initramfs.
    init_hash: String,
    disk_mib: u64,
    cmdline: String,
}

/// Builds the default image into `store` (as `<root>/<name>/`), idempotently: when
/// `image.json` exists and the inputs (kernel package, guest binary, busybox, disk size,
/// recipe version) are unchanged, the existing image is returned untouched unless `force`.
///
/// Base disks are immutable once written because VM overlays refer to them: the disk file
/// is named after its recipe and size (`base-<mib>m-v<n>.raw`), is reproducible
/// byte-for-byte, and is reused when present. A different size gives a new file; old ones are
/// left in place for the overlays that use them.
pub fn build_default(store: &ImageStore, opts: &BuildOptions) -> Result<Image, ImageError> {
    validate_image_name(&opts.name)?;
    if !(16..=16 * 1024 * 1024).contains(&opts.disk_mib) {
        return Err(ImageError::InvalidInput(format!(
            "disk_mib {} out of range (16 MiB to 16 TiB)",
            opts.disk_mib
        )));
    }
    let guest = read_static_binary(&opts.guest_bin, "guest binary").map_err(|e| match e {
        ImageError::InvalidInput(m) => ImageError::InvalidInput(format!(
            "{m}; build it with RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build \
             --release -p hatch-guest --target x86_64-unknown-linux-gnu"
        )),
        other => other,
    })?;
    let busybox_path = find_busybox()?;
    let busybox = read_static_binary(&busybox_path, "busybox")?;

    let dir = store.image_dir(&opts.name);
    let json_exists = dir.join(crate::IMAGE_JSON).exists();
    if json_exists && !dir.join(BUILD_JSON).exists() {
        return Err(ImageError::AlreadyExists(format!(
            "{} (a registered image, not a built one)",
            opts.name
        )));
    }

    let deb = kernel::locate_deb(&opts.cache_dir)?;
    let fingerprint = Fingerprint {
        format: BUILD_FORMAT,
        kernel_deb: deb
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        kernel_deb_size: util::check_regular_nonempty(&deb, "kernel package")?,
        guest_hash: hash(&guest),
        busybox_hash: hash(&busybox),
        init_hash: hash(initramfs::init_script(&[]).as_bytes()),
        disk_mib: opts.disk_mib,
        cmdline: DEFAULT_CMDLINE.into(),
    };
    if json_exists
        && !opts.force
        && let Some(img) = up_to_date(store, &opts.name, &dir, &fingerprint)
    {
        tracing::info!(image = %opts.name, "image is up to date");
        return Ok(img);
    }

    let tree = kernel::unpack(&deb, &opts.cache_dir)?;
    kernel::check_config(&tree.config)?;
    let index = ModuleIndex::load(&tree.modules_dir)?;
    let modules = index.resolve(&kernel::default_module_list(&tree.config))?;
    tracing::info!(
        release = %tree.release,
        modules = ?modules.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        "building image {}", opts.name
    );
    let mut module_data = Vec::with_capacity(modules.len());
    for m in &modules {
        module_data.push((m.name.clone(), kernel::read_module(&m.path)?));
    }
    let applets = busybox_applets(&busybox_path)?;

    fs::create_dir_all(&dir)
        .map_err(|e| ImageError::io(format!("creating {}", dir.display()), e))?;

    // Kernel and initramfs are replaced atomically; running VMs keep the old inodes.
    let kernel_path = install_kernel(&tree.vmlinuz, &dir)?;

    let initrd_path = dir.join("initrd.img");
    let tmp = util::tmp_sibling(&initrd_path);
    let spec = InitramfsSpec {
        busybox,
        applets,
        guest: stripped(&opts.guest_bin, guest),
        modules: module_data,
    };
    if let Err(e) = initramfs::write_initramfs(&spec, &tmp) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    rename(&tmp, &initrd_path)?;

    let disk_path = dir.join(format!("base-{}m-v{DISK_FORMAT}.raw", opts.disk_mib));
    let disk_ok = fs::metadata(&disk_path)
        .map(|m| m.is_file() && m.len() == opts.disk_mib << 20)
        .unwrap_or(false);
    if disk_ok {
        tracing::info!(disk = %disk_path.display(), "reusing base disk");
    } else {
        let tmp = util::tmp_sibling(&disk_path);
        if let Err(e) = make_base_disk(&tmp, opts.disk_mib) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        rename(&tmp, &disk_path)?;
    }

    let image = Image {
        name: opts.name.clone(),
        kernel: kernel_path,
        initrd: initrd_path,
        disk: disk_path,
        disk_format: "raw".into(),
        disk_mib: opts.disk_mib,
        cmdline: DEFAULT_CMDLINE.into(),
        created_at: util::now_rfc3339(),
        agent: true,
        app: None,
        id: None,
    };
    let fp_json = serde_json::to_vec_pretty(&fingerprint).map_err(|e| ImageError::Json {
        context: "serializing build fingerprint".into(),
        source: e,
    })?;
    util::write_atomic(&dir.join(BUILD_JSON), &fp_json)?;
    write_image_json(&dir, &image)?;
    tracing::info!(image = %opts.name, dir = %dir.display(), "image built");
    Ok(image)
}

/// Installs the kernel into `dir`: the uncompressed PVH-bootable `vmlinux` extracted from the
/// bzImage when possible (faster boots), else the bzImage itself as `vmlinuz`.
fn install_kernel(bzimage: &Path, dir: &Path) -> Result<PathBuf, ImageError> {
    let bz = fs::read(bzimage)
        .map_err(|e| ImageError::io(format!("reading {}", bzimage.display()), e))?;
    let (name, stale, data) = match bzimage::extract_vmlinux(&bz) {
        Ok(v) if elf::has_pvh_note(&v) => ("vmlinux", "vmlinuz", v),
        Ok(_) => {
            tracing::warn!("kernel has no PVH entry note; using the bzImage (slower boot)");
            ("vmlinuz", "vmlinux", bz)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot extract vmlinux; using the bzImage (slower boot)");
            ("vmlinuz", "vmlinux", bz)
        }
    };
    let path = dir.join(name);
    util::write_atomic(&path, &data)?;
    let _ = fs::remove_file(dir.join(stale));
    Ok(path)
}

/// The guest binary without symbols and debug info when `strip` (binutils) is available: a
/// release build carries several MiB of line tables, and every MiB of initramfs costs boot
/// time under TCG.
fn stripped(path: &Path, original: Vec<u8>) -> Vec<u8> {
    let Ok(tmp) = tempfile::NamedTempFile::new() else {
        return original;
    };
    let out = tmp.path().to_path_buf();
    match util::run(
        Command::new("strip")
            .arg("--strip-all")
            .arg("-o")
            .arg(&out)
            .arg(path),
    ) {
        Ok(_) => match fs::read(&out) {
            Ok(data) if elf::check_static_x86_64(&data).is_ok() => {
                tracing::debug!(
                    from = original.len(),
                    to = data.len(),
                    "stripped guest binary"
                );
                data
            }
            _ => original,
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot strip the guest binary; using it as is");
            original
        }
    }
}

fn hash(data: &[u8]) -> String {
    let mut h = Fnv::default();
    h.update(data);
    h.hex()
}

fn rename(from: &Path, to: &Path) -> Result<(), ImageError> {
    fs::rename(from, to).map_err(|e| {
        let _ = fs::remove_file(from);
        ImageError::io(format!("moving {} into place", to.display()), e)
    })
}

/// The existing image when its recorded fingerprint matches and its files are present.
fn up_to_date(store: &ImageStore, name: &str, dir: &Path, fp: &Fingerprint) -> Option<Image> {
    let recorded: Fingerprint =
        serde_json::from_slice(&fs::read(dir.join(BUILD_JSON)).ok()?).ok()?;
    if &recorded != fp {
        tracing::info!(image = %name, "inputs changed; rebuilding");
        return None;
    }
    let img = store.get(name).ok()?;
    (img.kernel.is_file() && img.initrd.is_file() && img.disk.is_file()).then_some(img)
}

/// Reads an executable and checks that it is a static x86-64 binary.
fn read_static_binary(path: &Path, what: &str) -> Result<Vec<u8>, ImageError> {
    util::check_regular_nonempty(path, what)?;
    let data =
        fs::read(path).map_err(|e| ImageError::io(format!("reading {}", path.display()), e))?;
    elf::check_static_x86_64(&data)
        .map_err(|e| ImageError::InvalidInput(format!("{what} {}: {e}", path.display())))?;
    Ok(data)
}

/// `$HATCH_BUSYBOX`, else the first statically linked busybox in the usual places
/// (Debian's `busybox-static` installs `/bin/busybox`).
fn find_busybox() -> Result<PathBuf, ImageError> {
    if let Some(p) = std::env::var_os(ENV_BUSYBOX) {
        return Ok(PathBuf::from(p));
    }
    let candidates = [
        "/bin/busybox",
        "/usr/bin/busybox",
        "/usr/lib/initramfs-tools/bin/busybox",
    ];
    for c in candidates {
        let p = Path::new(c);
        if let Ok(data) = fs::read(p)
            && elf::check_static_x86_64(&data).is_ok()
        {
            return Ok(p.to_path_buf());
        }
    }
    Err(ImageError::InvalidInput(
        "no statically linked busybox found (apt-get install busybox-static, or set \
         HATCH_BUSYBOX)"
            .into(),
    ))
}

/// Applet paths of a busybox binary (`busybox --list-full`, e.g. `bin/sh`).
fn busybox_applets(busybox: &Path) -> Result<Vec<String>, ImageError> {
    let out = util::run(Command::new(busybox).arg("--list-full"))?;
    let list: Vec<String> = String::from_utf8_lossy(&out)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    if !list.iter().any(|a| a == "bin/sh") {
        return Err(ImageError::InvalidInput(format!(
            "{} --list-full has no bin/sh applet",
            busybox.display()
        )));
    }
    Ok(list)
}

/// Creates the sparse raw ext4 base disk at `path` (which must not exist): an empty `kv/`
/// directory, fixed UUID, hash seed and timestamps so the result is reproducible, and inode
/// tables marked initialized so the guest kernel does not zero them (which would write to every
/// VM's overlay).
fn make_base_disk(path: &Path, disk_mib: u64) -> Result<(), ImageError> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let src = tempfile::Builder::new()
        .prefix(".disk-src-")
        .tempdir_in(parent)
        .map_err(|e| {
            ImageError::io(
                format!("creating a temporary directory in {}", parent.display()),
                e,
            )
        })?;
    let kv = src.path().join("kv");
    fs::create_dir(&kv).map_err(|e| ImageError::io(format!("creating {}", kv.display()), e))?;
    let epoch = std::time::UNIX_EPOCH + std::time::Duration::from_secs(DISK_EPOCH);
    for d in [kv.as_path(), src.path()] {
        let times = fs::FileTimes::new().set_accessed(epoch).set_modified(epoch);
        fs::File::open(d)
            .and_then(|f| f.set_times(times))
            .map_err(|e| ImageError::io(format!("setting times of {}", d.display()), e))?;
    }
    let size = format!("{disk_mib}M");
    let mkfs = |extended: &str| {
        util::run(
            Command::new("mkfs.ext4")
                .env("E2FSPROGS_FAKE_TIME", DISK_EPOCH.to_string())
                .args(["-q", "-F", "-T", "default", "-b", "4096", "-m", "0"])
                .args(["-L", DISK_LABEL, "-U", DISK_UUID])
                .arg("-E")
                .arg(format!(
                    "hash_seed={DISK_HASH_SEED},root_owner=0:0,{extended}"
                ))
                .arg("-d")
                .arg(src.path())
                .arg(path)
                .arg(&size),
        )
    };
    // The file is new (all zeros), so the inode tables and journal need no zeroing.
    if let Err(e) = mkfs("assume_storage_prezeroed=1") {
        tracing::warn!(error = %e, "mkfs.ext4 without assume_storage_prezeroed (older e2fsprogs?)");
        let _ = fs::remove_file(path);
        mkfs("lazy_itable_init=0,lazy_journal_init=0")?;
    }
    // `mkfs -d` copies the source directories' ctime (which cannot be set); pin it and atime
    // so the image is reproducible. Cosmetic: failure only costs reproducibility.
    let cmds = src.path().join("debugfs.cmds");
    let script: String = ["/kv", "/"]
        .iter()
        .flat_map(|p| {
            ["ctime", "atime", "mtime"].map(|f| format!("set_inode_field {p} {f} @{DISK_EPOCH}\n"))
        })
        .collect();
    let pinned = fs::write(&cmds, script)
        .map_err(|e| ImageError::io(format!("writing {}", cmds.display()), e))
        .and_then(|()| {
            util::run(
                Command::new("debugfs")
                    .env("E2FSPROGS_FAKE_TIME", DISK_EPOCH.to_string())
                    .arg("-w")
                    .arg("-f")
                    .arg(&cmds)
                    .arg(path),
            )
        });
    if let Err(e) = pinned {
        tracing::warn!(error = %e, "could not pin base disk timestamps; the disk is not reproducible");
    }
    let f = fs::File::open(path)
        .map_err(|e| ImageError::io(format!("opening {}", path.display()), e))?;
    f.sync_all()
        .map_err(|e| ImageError::io(format!("syncing {}", path.display()), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn have(tool: &str) -> bool {
        Command::new(tool).arg("-V").output().is_ok()
    }

    #[test]
    fn base_disk_is_reproducible_and_sparse() {
        if !have("mkfs.ext4") {
            eprintln!("mkfs.ext4 not installed; skipping");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a.raw");
        let b = tmp.path().join("b.raw");
        make_base_disk(&a, 64).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        make_base_disk(&b, 64).unwrap();
        assert_eq!(fs::metadata(&a).unwrap().len(), 64 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(fs::metadata(&a).unwrap().blocks() * 512 < 16 << 20);
        if have("debugfs") {
            assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
            let out = Command::new("debugfs")
                .args(["-R", "ls -l /"])
                .arg(&a)
                .output()
                .unwrap();
            assert!(String::from_utf8_lossy(&out.stdout).contains("kv"));
        }
    }

    #[test]
    fn rejects_dynamic_guest() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path()).unwrap();
        let opts = BuildOptions {
            cache_dir: tmp.path().join("cache"),
            guest_bin: std::env::current_exe().unwrap(),
            ..BuildOptions::default()
        };
        if cfg!(target_feature = "crt-static") {
            return;
        }
        let err = build_default(&store, &opts).unwrap_err().to_string();
        assert!(err.contains("crt-static"), "{err}");
    }
}
