//! The guest kernel: Debian's `linux-image-*-cloud-amd64` package, downloaded with
//! `apt-get download`, unpacked with `dpkg-deb -x`, and its modules resolved with dependencies.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{self, natural_cmp};
use crate::{ImageError, elf};

/// Environment variable naming a kernel `.deb` to use instead of searching the cache.
pub const ENV_KERNEL_DEB: &str = "HATCH_KERNEL_DEB";
/// Environment variable naming the kernel package to download (default: what the
/// `linux-image-cloud-amd64` meta-package depends on, else the newest match).
pub const ENV_KERNEL_PACKAGE: &str = "HATCH_KERNEL_PACKAGE";

const META_PACKAGE: &str = "linux-image-cloud-amd64";

/// True for a real kernel package `linux-image-<version>-cloud-amd64` (e.g. version
/// `6.1.0-53` or `6.12.117+deb12`), not `-dbg`/`-unsigned` variants nor meta-packages like
/// `linux-image-6.12-cloud-amd64` (whose version has fewer than two dots).
fn is_kernel_package(name: &str) -> bool {
    name.strip_prefix("linux-image-")
        .and_then(|r| r.strip_suffix("-cloud-amd64"))
        .is_some_and(|v| {
            v.starts_with(|c: char| c.is_ascii_digit())
                && v.matches('.').count() >= 2
                && !v.contains("-dbg")
        })
}

/// Package name and version from a `.deb` file name `name_version_arch.deb`.
fn parse_deb_name(file: &str) -> Option<(&str, &str)> {
    let stem = file.strip_suffix(".deb")?;
    let mut parts = stem.splitn(3, '_');
    let name = parts.next()?;
    let version = parts.next()?;
    let arch = parts.next()?;
    (arch == "amd64" && is_kernel_package(name)).then_some((name, version))
}

/// Newest cached kernel `.deb` in `dirs`.
fn newest_cached_deb(dirs: &[PathBuf]) -> Option<PathBuf> {
    let mut found: Vec<(String, String, PathBuf)> = Vec::new();
    for dir in dirs {
        let Ok(rd) = fs::read_dir(dir) else { continue };
        for e in rd.flatten() {
            let file = e.file_name();
            let Some(file) = file.to_str() else { continue };
            if let Some((name, version)) = parse_deb_name(file) {
                found.push((name.to_string(), version.to_string(), e.path()));
            }
        }
    }
    found
        .into_iter()
        .max_by(|a, b| natural_cmp(&a.0, &b.0).then_with(|| natural_cmp(&a.1, &b.1)))
        .map(|(_, _, p)| p)
}

/// The kernel package to download: `$HATCH_KERNEL_PACKAGE`, else the dependency of the
/// `linux-image-cloud-amd64` meta-package, else the newest `linux-image-*-cloud-amd64` that
/// `apt-cache search` knows.
fn pick_package() -> Result<String, ImageError> {
    if let Ok(p) = std::env::var(ENV_KERNEL_PACKAGE) {
        return Ok(p);
    }
    if let Ok(out) = util::run(Command::new("apt-cache").args(["depends", META_PACKAGE])) {
        let text = String::from_utf8_lossy(&out);
        if let Some(dep) = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends:"))
            .map(str::trim)
            .find(|d| is_kernel_package(d))
        {
            return Ok(dep.to_string());
        }
    }
    let out = util::run(Command::new("apt-cache").args([
        "search",
        "--names-only",
        "^linux-image-[0-9].*-cloud-amd64$",
    ]))?;
    let text = String::from_utf8_lossy(&out);
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| is_kernel_package(n))
        .max_by(|a, b| natural_cmp(a, b))
        .map(str::to_string)
        .ok_or_else(|| {
            ImageError::Kernel(
                "no linux-image-*-cloud-amd64 package known to apt (run apt-get update, or set \
                 HATCH_KERNEL_DEB to a downloaded .deb)"
                    .into(),
            )
        })
}

/// Finds the kernel `.deb`: `$HATCH_KERNEL_DEB`, else the newest one cached in
/// `<cache>/debs` (or `<cache>` itself), else downloads one into `<cache>/debs`.
pub fn locate_deb(cache_dir: &Path) -> Result<PathBuf, ImageError> {
    if let Some(p) = std::env::var_os(ENV_KERNEL_DEB) {
        let p = PathBuf::from(p);
        util::check_regular_nonempty(&p, ENV_KERNEL_DEB)?;
        return Ok(p);
    }
    let debs = cache_dir.join("debs");
    if let Some(p) = newest_cached_deb(&[debs.clone(), cache_dir.to_path_buf()]) {
        return Ok(p);
    }
    fs::create_dir_all(&debs)
        .map_err(|e| ImageError::io(format!("creating {}", debs.display()), e))?;
    let pkg = pick_package()?;
    tracing::info!(package = %pkg, dir = %debs.display(), "downloading guest kernel");
    util::run(
        Command::new("apt-get")
            .args(["download", "-q", &pkg])
            .current_dir(&debs),
    )?;
    newest_cached_deb(std::slice::from_ref(&debs)).ok_or_else(|| {
        ImageError::Kernel(format!(
            "apt-get download {pkg} left no linux-image-*-cloud-amd64 .deb in {}",
            debs.display()
        ))
    })
}

/// An unpacked kernel package.
#[derive(Debug, Clone)]
pub struct KernelTree {
    /// `uname -r` of the kernel, e.g. `6.1.0-53-cloud-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// Parsed `boot/config-*`: `CONFIG_X` -> `y`/`m`/value.
    pub config: HashMap<String, String>,
    /// `lib/modules/<release>`.
    pub modules_dir: PathBuf,
}

/// Unpacks `deb` (once) into `<cache>/kernels/<deb stem>/` and describes it.
pub fn unpack(deb: &Path, cache_dir: &Path) -> Result<KernelTree, ImageError> {
    let stem = deb
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| ImageError::Kernel(format!("bad .deb name {}", deb.display())))?;
    let kernels = cache_dir.join("kernels");
    let dest = kernels.join(stem);
    if !dest.join(".complete").exists() {
        fs::create_dir_all(&kernels)
            .map_err(|e| ImageError::io(format!("creating {}", kernels.display()), e))?;
        let staging = util::TempDir::new_in(&kernels, stem)?;
        tracing::info!(deb = %deb.display(), "unpacking kernel package");
        util::run(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(deb)
                .arg(staging.path()),
        )?;
        util::write_atomic(&staging.path().join(".complete"), b"")?;
        if dest.exists() {
            fs::remove_dir_all(&dest)
                .map_err(|e| ImageError::io(format!("removing stale {}", dest.display()), e))?;
        }
        fs::rename(staging.path(), &dest).map_err(|e| {
            ImageError::io(format!("moving unpacked kernel to {}", dest.display()), e)
        })?;
        staging.disarm();
    }
    describe_tree(&dest)
}

fn describe_tree(root: &Path) -> Result<KernelTree, ImageError> {
    let boot = root.join("boot");
    let rd = fs::read_dir(&boot).map_err(|e| {
        ImageError::io(
            format!("{} (is this a linux-image package?)", boot.display()),
            e,
        )
    })?;
    let mut releases: Vec<String> = rd
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_string)
        })
        .collect();
    releases.sort_by(|a, b| natural_cmp(a, b));
    let release = releases
        .pop()
        .ok_or_else(|| ImageError::Kernel(format!("no vmlinuz-* in {}", boot.display())))?;
    let config_path = boot.join(format!("config-{release}"));
    let config_text = fs::read_to_string(&config_path)
        .map_err(|e| ImageError::io(format!("reading {}", config_path.display()), e))?;
    let config = parse_config(&config_text);
    let modules_dir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| root.join(d).join(&release))
        .find(|p| p.is_dir())
        .ok_or_else(|| {
            ImageError::Kernel(format!(
                "no modules directory for {release} in {}",
                root.display()
            ))
        })?;
    Ok(KernelTree {
        vmlinuz: boot.join(format!("vmlinuz-{release}")),
        release,
        config,
        modules_dir,
    })
}

/// Parses a kernel `.config`: `CONFIG_X=v` lines (comments and unset options are skipped).
pub fn parse_config(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|l| l.starts_with("CONFIG_"))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

/// A module to put into the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Normalized name (`_` for `-`), e.g. `virtio_blk`.
    pub name: String,
    /// The `.ko` (possibly compressed) in the unpacked package.
    pub path: PathBuf,
}

/// Module names use `_` and `-` interchangeably.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Module name and compression suffix of a module file name.
fn module_file_name(file: &str) -> Option<(String, &'static str)> {
    for suffix in [".ko", ".ko.xz", ".ko.zst", ".ko.gz"] {
        if let Some(stem) = file.strip_suffix(suffix) {
            return Some((normalize(stem), suffix));
        }
    }
    None
}

/// Index of the modules of a kernel tree and of what is built in.
#[derive(Debug)]
pub struct ModuleIndex {
    files: HashMap<String, PathBuf>,
    builtin: HashSet<String>,
}

impl ModuleIndex {
    pub fn load(modules_dir: &Path) -> Result<Self, ImageError> {
        let mut files = HashMap::new();
        let mut stack = vec![modules_dir.join("kernel")];
        while let Some(dir) = stack.pop() {
            let rd = fs::read_dir(&dir)
                .map_err(|e| ImageError::io(format!("listing {}", dir.display()), e))?;
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Some((name, _)) = e.file_name().to_str().and_then(module_file_name) {
                    files.insert(name, p);
                }
            }
        }
        let builtin_path = modules_dir.join("modules.builtin");
        let builtin = fs::read_to_string(&builtin_path)
            .map_err(|e| ImageError::io(format!("reading {}", builtin_path.display()), e))?
            .lines()
            .filter_map(|l| l.rsplit('/').next())
            .filter_map(module_file_name)
            .map(|(n, _)| n)
            .collect();
        Ok(ModuleIndex { files, builtin })
    }

    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize(name))
    }

    /// Resolves `wanted` (in order) to loadable modules with their dependencies first,
    /// skipping built-in ones. Missing `required` modules are an error, missing optional ones
    /// are skipped with a warning.
    pub fn resolve(&self, wanted: &[(&str, bool)]) -> Result<Vec<Module>, ImageError> {
        let mut out: Vec<Module> = Vec::new();
        let mut seen = HashSet::new();
        for (name, required) in wanted {
            let name = normalize(name);
            if self.is_builtin(&name) {
                tracing::debug!(module = %name, "built in");
                continue;
            }
            if !self.files.contains_key(&name) {
                if *required {
                    return Err(ImageError::Kernel(format!(
                        "module {name} is neither built in nor present as a .ko"
                    )));
                }
                tracing::warn!(module = %name, "optional module not available; skipped");
                continue;
            }
            self.visit(&name, &mut seen, &mut Vec::new(), &mut out)?;
        }
        Ok(out)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut HashSet<String>,
        path: &mut Vec<String>,
        out: &mut Vec<Module>,
    ) -> Result<(), ImageError> {
        if seen.contains(name) || self.is_builtin(name) {
            return Ok(());
        }
        if path.iter().any(|p| p == name) {
            return Err(ImageError::Kernel(format!(
                "module dependency cycle: {} -> {name}",
                path.join(" -> ")
            )));
        }
        let file = self.files.get(name).ok_or_else(|| {
            ImageError::Kernel(format!(
                "module {name} (needed by {}) not found",
                path.last().map(String::as_str).unwrap_or("?")
            ))
        })?;
        let bytes = read_module(file)?;
        let info = elf::modinfo(&bytes)
            .map_err(|e| ImageError::Kernel(format!("{}: {e}", file.display())))?;
        let mut deps: Vec<String> = Vec::new();
        for (k, v) in &info {
            match k.as_str() {
                "depends" => deps.extend(v.split(',').filter(|d| !d.is_empty()).map(normalize)),
                // `softdep=pre: crc32c` and the like: load them first when available.
                "softdep" => {
                    let mut pre = false;
                    for w in v.split_whitespace() {
                        match w {
                            "pre:" => pre = true,
                            "post:" => pre = false,
                            m if pre => {
                                let m = normalize(m);
                                if self.files.contains_key(&m) {
                                    deps.push(m);
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        path.push(name.to_string());
        for d in deps {
            self.visit(&d, seen, path, out)?;
        }
        path.pop();
        seen.insert(name.to_string());
        out.push(Module {
            name: name.to_string(),
            path: file.clone(),
        });
        Ok(())
    }
}

/// Reads a module, decompressing `.ko.xz`/`.ko.zst`/`.ko.gz` with the host tools (the
/// initramfs gets plain `.ko` files that busybox `insmod` can load).
pub fn read_module(path: &Path) -> Result<Vec<u8>, ImageError> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        Some("xz")
    } else if name.ends_with(".ko.zst") {
        Some("zstd")
    } else if name.ends_with(".ko.gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => {
            fs::read(path).map_err(|e| ImageError::io(format!("reading {}", path.display()), e))
        }
        Some(tool) => util::run(Command::new(tool).arg("-dc").arg(path)),
    }
}

/// Which modules the default image needs, in load order: `(name, required)`.
pub fn default_module_list(config: &HashMap<String, String>) -> Vec<(&'static str, bool)> {
    let mut wanted = vec![
        ("virtio_ring", true),
        ("virtio", true),
        ("virtio_mmio", true),
        ("virtio_blk", true),
        ("failover", true),
        ("net_failover", true),
        ("virtio_net", true),
        // Channel for a host<->guest agent (virtio-serial), and a hardware RNG the host can
        // use to reseed the guest after a restore.
        ("virtio_console", false),
        ("virtio_rng", false),
    ];
    if config.get("CONFIG_EXT4_FS").map(String::as_str) == Some("m") {
        wanted.push(("ext4", true));
    }
    wanted
}

/// Checks the kernel options the default image relies on.
pub fn check_config(config: &HashMap<String, String>) -> Result<(), ImageError> {
    let want = |k: &str| config.get(k).map(String::as_str);
    if want("CONFIG_EXT4_FS").is_none() {
        return Err(ImageError::Kernel("kernel has no ext4 support".into()));
    }
    if want("CONFIG_BLK_DEV_INITRD") != Some("y") {
        return Err(ImageError::Kernel("kernel has no initramfs support".into()));
    }
    if want("CONFIG_DEVTMPFS") != Some("y") {
        return Err(ImageError::Kernel("kernel has no devtmpfs".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb_names() {
        assert_eq!(
            parse_deb_name("linux-image-6.1.0-53-cloud-amd64_6.1.187-1_amd64.deb"),
            Some(("linux-image-6.1.0-53-cloud-amd64", "6.1.187-1"))
        );
        assert_eq!(
            parse_deb_name("linux-image-6.1.0-53-cloud-amd64-dbg_6.1.187-1_amd64.deb"),
            None
        );
        assert_eq!(
            parse_deb_name("linux-image-6.1.0-53-cloud-amd64-unsigned_6.1.187-1_amd64.deb"),
            None
        );
        assert_eq!(
            parse_deb_name("linux-image-cloud-amd64_6.1.187-1_amd64.deb"),
            None
        );
        assert!(is_kernel_package("linux-image-6.12.117+deb12-cloud-amd64"));
        assert!(!is_kernel_package("linux-image-6.12-cloud-amd64"));
        assert!(!is_kernel_package("linux-image-cloud-amd64"));
    }

    #[test]
    fn newest_cached() {
        let tmp = tempfile::tempdir().unwrap();
        for f in [
            "linux-image-6.1.0-9-cloud-amd64_6.1.27-1_amd64.deb",
            "linux-image-6.1.0-53-cloud-amd64_6.1.187-1_amd64.deb",
            "linux-image-6.1.0-53-cloud-amd64-dbg_6.1.187-1_amd64.deb",
            "other.deb",
        ] {
            fs::write(tmp.path().join(f), b"x").unwrap();
        }
        let p = newest_cached_deb(&[tmp.path().to_path_buf()]).unwrap();
        assert!(p.ends_with("linux-image-6.1.0-53-cloud-amd64_6.1.187-1_amd64.deb"));
    }

    #[test]
    fn config_parsing() {
        let c =
            parse_config("# c\nCONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\nCONFIG_D=\"x y\"\n");
        assert_eq!(c.get("CONFIG_A").map(String::as_str), Some("y"));
        assert_eq!(c.get("CONFIG_B").map(String::as_str), Some("m"));
        assert_eq!(c.get("CONFIG_D").map(String::as_str), Some("x y"));
        assert!(!c.contains_key("CONFIG_C"));
        assert!(!default_module_list(&c).iter().any(|(n, _)| *n == "ext4"));
        let c = parse_config("CONFIG_EXT4_FS=m\n");
        assert!(default_module_list(&c).iter().any(|(n, _)| *n == "ext4"));
    }

    #[test]
    fn module_file_names() {
        assert_eq!(
            module_file_name("virtio-rng.ko"),
            Some(("virtio_rng".into(), ".ko"))
        );
        assert_eq!(
            module_file_name("ext4.ko.xz"),
            Some(("ext4".into(), ".ko.xz"))
        );
        assert_eq!(module_file_name("modules.dep"), None);
    }
}
