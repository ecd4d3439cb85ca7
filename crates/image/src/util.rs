//! Small file, process and time helpers.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::ImageError;

/// Runs a command, returning its stdout; a non-zero exit becomes [`ImageError::Command`]
/// carrying the tail of stderr.
pub fn run(cmd: &mut Command) -> Result<Vec<u8>, ImageError> {
    let shown = describe(cmd);
    let out = cmd.output().map_err(|e| ImageError::Command {
        command: shown.clone(),
        detail: if e.kind() == io::ErrorKind::NotFound {
            format!("{e} (is the program installed?)")
        } else {
            e.to_string()
        },
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: String = stderr
            .lines()
            .rev()
            .take(8)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        return Err(ImageError::Command {
            command: shown,
            detail: format!("{}: {}", out.status, tail.trim()),
        });
    }
    Ok(out.stdout)
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes `data` to `path` via a temporary file, fsync and rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    let tmp = tmp_sibling(path);
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(ImageError::io(format!("writing {}", path.display()), e));
    }
    if let Some(parent) = path.parent() {
        fsync_dir(parent)?;
    }
    Ok(())
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A unique hidden sibling path of `path` for staging a replacement.
pub fn tmp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp-{}-{seq}", std::process::id()))
}

/// Fsyncs a directory so that renames in it are durable.
pub fn fsync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| ImageError::io(format!("syncing directory {}", dir.display()), e))
}

/// A directory removed on drop unless [`TempDir::disarm`]ed (used to stage results).
pub struct TempDir {
    path: PathBuf,
    armed: bool,
}

impl TempDir {
    /// Creates a hidden directory `.<label>.tmp-…` in `parent`.
    pub fn new_in(parent: &Path, label: &str) -> Result<Self, ImageError> {
        let path = tmp_sibling(&parent.join(label));
        fs::create_dir_all(&path)
            .map_err(|e| ImageError::io(format!("creating {}", path.display()), e))?;
        Ok(TempDir { path, armed: true })
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Keeps the directory (it was renamed into place).
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// `lseek` with `SEEK_DATA`/`SEEK_HOLE`; `None` when there is no more data (ENXIO) or the
/// filesystem does not support it (then the caller treats the rest as data).
fn seek_data_hole(f: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    // SAFETY: lseek only takes integers; the fd is valid while `f` is borrowed.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

/// Call `f(start, end)` for each data extent of `file` within `from..to`
/// (clipped to that range), as SEEK_DATA/SEEK_HOLE report them now.
pub(crate) fn for_each_extent(
    file: &File,
    from: u64,
    to: u64,
    mut f: impl FnMut(u64, u64) -> io::Result<()>,
) -> io::Result<()> {
    let mut off = from;
    while off < to {
        let Some(data) = seek_data_hole(file, off, libc::SEEK_DATA)? else {
            break;
        };
        if data >= to {
            break;
        }
        let hole = seek_data_hole(file, data, libc::SEEK_HOLE)?.map_or(to, |h| h.min(to));
        f(data, hole)?;
        off = hole.max(data + 1);
    }
    Ok(())
}

/// Copies `src` to the new file `dst`, keeping holes (and punching new ones for runs of zeros)
/// so that sparse disk images stay sparse. Fsyncs `dst`.
pub fn copy_sparse(src: &Path, dst: &Path) -> Result<u64, ImageError> {
    copy_sparse_inner(src, dst, true)
}

/// [`copy_sparse`] without the fsync: for copies whose durability the caller
/// handles later (or never needs, like a RAM file for a guest about to run).
pub fn copy_sparse_unsynced(src: &Path, dst: &Path) -> Result<u64, ImageError> {
    copy_sparse_inner(src, dst, false)
}

/// Create `dst` as long as `src`, with its space allocated wherever `src`
/// has data. On tmpfs that allocates (and zeroes) the pages, which is most
/// of what a first copy costs there; done before a guest pauses, the copy
/// under the pause ([`crate::PreparedCopy`]) then only moves bytes.
pub(crate) fn preallocate_like(src: &Path, dst: &Path) -> Result<(), ImageError> {
    let res = (|| -> io::Result<()> {
        let s = File::open(src)?;
        let len = s.metadata()?.len();
        let d = OpenOptions::new().write(true).create_new(true).open(dst)?;
        d.set_len(len)?;
        for_each_extent(&s, 0, len, |data, hole| {
            let (start, n) = (data as libc::off_t, (hole - data) as libc::off_t);
            // SAFETY: fallocate(2) on a descriptor this function owns, with
            // a range inside the file; no memory is passed.
            if unsafe { libc::fallocate(d.as_raw_fd(), 0, start, n) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    })();
    res.map_err(|e| {
        let _ = fs::remove_file(dst);
        ImageError::io(
            format!("preallocating {} like {}", dst.display(), src.display()),
            e,
        )
    })
}

fn copy_sparse_inner(src: &Path, dst: &Path, sync: bool) -> Result<u64, ImageError> {
    let ctx = || format!("copying {} to {}", src.display(), dst.display());
    let res = (|| -> io::Result<u64> {
        let s = File::open(src)?;
        let len = s.metadata()?.len();
        let d = OpenOptions::new().write(true).create_new(true).open(dst)?;
        d.set_len(len)?;
        // Large files (RAM images, copied while a guest is paused) are split
        // between threads: the copy is memory bound and the cores are idle.
        let threads = if len >= COPY_SPLIT_MIN {
            std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
        } else {
            1
        } as u64;
        let step = len.div_ceil(threads).next_multiple_of(COPY_BUF as u64);
        std::thread::scope(|scope| {
            let parts: Vec<_> = (0..threads)
                .map(|i| {
                    let (s, d) = (&s, &d);
                    let (start, end) = ((i * step).min(len), ((i + 1) * step).min(len));
                    scope.spawn(move || copy_range_sparse(s, d, start, end))
                })
                .collect();
            parts.into_iter().try_for_each(|p| {
                p.join()
                    .unwrap_or_else(|_| Err(io::Error::other("copy thread panicked")))
            })
        })?;
        if sync {
            d.sync_all()?;
        }
        Ok(len)
    })();
    res.map_err(|e| {
        let _ = fs::remove_file(dst);
        ImageError::io(ctx(), e)
    })
}

const COPY_BUF: usize = 1 << 20;
const COPY_SPLIT_MIN: u64 = 64 << 20;

/// Copy the data extents of `[start, end)` from `s` to `d` at the same
/// offsets, skipping holes and all-zero blocks.
fn copy_range_sparse(s: &File, d: &File, start: u64, end: u64) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUF];
    let mut off = start;
    while off < end {
        let data = match seek_data_hole(s, off, libc::SEEK_DATA) {
            Ok(Some(d)) => d,
            Ok(None) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => off,
            Err(e) => return Err(e),
        };
        if data >= end {
            break;
        }
        let hole = match seek_data_hole(s, data, libc::SEEK_HOLE) {
            Ok(Some(h)) => h.min(end),
            Ok(None) => end,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => end,
            Err(e) => return Err(e),
        };
        let mut pos = data;
        while pos < hole {
            let n = usize::try_from((hole - pos).min(buf.len() as u64)).unwrap_or(buf.len());
            s.read_exact_at(&mut buf[..n], pos)?;
            if buf[..n].iter().any(|b| *b != 0) {
                d.write_all_at(&buf[..n], pos)?;
            }
            pos += n as u64;
        }
        off = hole.max(off + 1);
    }
    Ok(())
}

/// Format and virtual size of a disk image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    pub format: String,
    pub virtual_size: u64,
}

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// Detects a disk's format with `qemu-img info --output=json` (falling back to reading the
/// qcow2 header when qemu-img is not installed). Only raw and standalone qcow2 are accepted.
pub fn disk_info(disk: &Path) -> Result<DiskInfo, ImageError> {
    check_regular_nonempty(disk, "disk")?;
    let unsupported = |reason: String| ImageError::UnsupportedDisk {
        path: disk.to_path_buf(),
        reason,
    };
    let out = Command::new("qemu-img")
        .arg("info")
        .arg("--output=json")
        .arg(disk)
        .output();
    let info = match out {
        Ok(out) if out.status.success() => {
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).map_err(|e| ImageError::Json {
                    context: format!("parsing `qemu-img info` of {}", disk.display()),
                    source: e,
                })?;
            let format = v["format"].as_str().unwrap_or_default().to_string();
            let virtual_size = v["virtual-size"]
                .as_u64()
                .ok_or_else(|| unsupported("qemu-img reports no virtual size".into()))?;
            if v.get("backing-filename").is_some() {
                return Err(unsupported(
                    "qcow2 with a backing file; flatten it first (qemu-img convert -O qcow2)"
                        .into(),
                ));
            }
            DiskInfo {
                format,
                virtual_size,
            }
        }
        Ok(out) => {
            return Err(unsupported(format!(
                "qemu-img info failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            tracing::warn!("qemu-img not found; detecting the disk format from its header");
            disk_info_from_header(disk)?
        }
        Err(e) => return Err(ImageError::io("running qemu-img", e)),
    };
    match info.format.as_str() {
        "raw" | "qcow2" => {}
        other => {
            return Err(unsupported(format!(
                "format {other:?}; only raw and qcow2 are supported"
            )));
        }
    }
    if info.virtual_size == 0 {
        return Err(unsupported("virtual size is 0".into()));
    }
    Ok(info)
}

fn disk_info_from_header(disk: &Path) -> Result<DiskInfo, ImageError> {
    let ctx = || format!("reading {}", disk.display());
    let mut f = File::open(disk).map_err(|e| ImageError::io(ctx(), e))?;
    let len = f.metadata().map_err(|e| ImageError::io(ctx(), e))?.len();
    let mut hdr = [0u8; 32];
    let n = f.read(&mut hdr).map_err(|e| ImageError::io(ctx(), e))?;
    if n >= 32 && &hdr[..4] == QCOW2_MAGIC {
        let backing_len = u32::from_be_bytes([hdr[16], hdr[17], hdr[18], hdr[19]]);
        if backing_len != 0 {
            return Err(ImageError::UnsupportedDisk {
                path: disk.to_path_buf(),
                reason: "qcow2 with a backing file".into(),
            });
        }
        let mut size = [0u8; 8];
        size.copy_from_slice(&hdr[24..32]);
        return Ok(DiskInfo {
            format: "qcow2".into(),
            virtual_size: u64::from_be_bytes(size),
        });
    }
    Ok(DiskInfo {
        format: "raw".into(),
        virtual_size: len,
    })
}

/// Errors unless `path` is a non-empty regular file.
pub fn check_regular_nonempty(path: &Path, what: &str) -> Result<u64, ImageError> {
    let md =
        fs::metadata(path).map_err(|e| ImageError::io(format!("{what} {}", path.display()), e))?;
    if !md.is_file() {
        return Err(ImageError::InvalidInput(format!(
            "{what} {} is not a regular file",
            path.display()
        )));
    }
    if md.len() == 0 {
        return Err(ImageError::InvalidInput(format!(
            "{what} {} is empty",
            path.display()
        )));
    }
    Ok(md.len())
}

/// Errors unless `path` looks like an x86 kernel QEMU can boot directly: a bzImage (setup
/// header magic `HdrS`) or an ELF vmlinux (PVH).
pub fn check_kernel_file(path: &Path) -> Result<(), ImageError> {
    check_regular_nonempty(path, "kernel")?;
    let mut hdr = [0u8; 0x206];
    let mut f =
        File::open(path).map_err(|e| ImageError::io(format!("kernel {}", path.display()), e))?;
    let n = read_up_to(&mut f, &mut hdr)
        .map_err(|e| ImageError::io(format!("kernel {}", path.display()), e))?;
    let bz = n >= 0x206 && &hdr[0x202..0x206] == b"HdrS";
    let elf = n >= 4 && &hdr[..4] == b"\x7fELF";
    if bz || elf {
        Ok(())
    } else {
        Err(ImageError::InvalidInput(format!(
            "kernel {} is neither a bzImage nor an ELF vmlinux",
            path.display()
        )))
    }
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// 64-bit FNV-1a, a stable (toolchain-independent) hash for build fingerprints.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// Current UTC time as RFC 3339 (`2024-01-02T03:04:05Z`).
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// Formats Unix seconds as RFC 3339 UTC.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Compares two version-like strings naturally (runs of digits numerically).
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(cb.iter()) {
        let ord = match (x, y) {
            ((true, xs), (true, ys)) => {
                let (xt, yt) = (xs.trim_start_matches('0'), ys.trim_start_matches('0'));
                xt.len().cmp(&yt.len()).then_with(|| xt.cmp(yt))
            }
            ((_, xs), (_, ys)) => xs.cmp(ys),
        };
        if ord != std::cmp::Ordering::Equal {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering;

    #[test]
    fn time_format() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn natural_order() {
        assert_eq!(
            natural_cmp("6.1.0-9-cloud", "6.1.0-53-cloud"),
            Ordering::Less
        );
        assert_eq!(natural_cmp("6.12.1", "6.1.0"), Ordering::Greater);
        assert_eq!(natural_cmp("a", "a"), Ordering::Equal);
        assert_eq!(natural_cmp("", "1"), Ordering::Less);
    }

    #[test]
    fn sparse_copy_keeps_holes_and_content() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"hello", 10 << 20).unwrap();
        f.write_all_at(b"end", (64 << 20) - 3).unwrap();
        drop(f);
        let dst = tmp.path().join("dst");
        assert_eq!(copy_sparse(&src, &dst).unwrap(), 64 << 20);
        assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
        use std::os::unix::fs::MetadataExt;
        // At most a few MiB allocated.
        assert!(fs::metadata(&dst).unwrap().blocks() * 512 < 8 << 20);
        // Refuses to overwrite.
        assert!(copy_sparse(&src, &dst).is_err());
    }

    #[test]
    fn split_copy_of_an_odd_sized_file_is_exact() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let len = (96 << 20) + 12345;
        let f = File::create(&src).unwrap();
        f.set_len(len).unwrap();
        // Data across every possible split point and up to the last byte.
        for (i, at) in [
            0u64,
            (32 << 20) - 7,
            (48 << 20) - 5,
            (64 << 20) - 2,
            len - 9,
        ]
        .into_iter()
        .enumerate()
        {
            f.write_all_at(format!("chunk-{i}!").as_bytes(), at)
                .unwrap();
        }
        drop(f);
        let dst = tmp.path().join("dst");
        assert_eq!(copy_sparse_unsynced(&src, &dst).unwrap(), len);
        assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
    }

    #[test]
    fn qcow2_header_detection() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("q");
        let mut hdr = vec![0u8; 512];
        hdr[..4].copy_from_slice(QCOW2_MAGIC);
        hdr[24..32].copy_from_slice(&(5u64 << 30).to_be_bytes());
        fs::write(&p, &hdr).unwrap();
        let i = disk_info_from_header(&p).unwrap();
        assert_eq!(i.format, "qcow2");
        assert_eq!(i.virtual_size, 5 << 30);
    }
}
