//! Online growth of the ext4 data filesystem to the size of its block device.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// `EXT4_IOC_RESIZE_FS` = `_IOW('f', 16, __u64)`.
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;
/// `BLKGETSIZE64` = `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// True when the kernel command line has `flag=1` (or `flag=true`/`flag=yes`, or a bare `flag`).
pub fn cmdline_flag(cmdline: &str, flag: &str) -> bool {
    cmdline.split_whitespace().any(|w| match w.split_once('=') {
        Some((k, v)) => k == flag && matches!(v, "1" | "true" | "yes" | "on"),
        None => w == flag,
    })
}

/// Finds the block device mounted at `mount_point` from `/proc/self/mounts`.
fn mount_source(mounts: &str, mount_point: &Path) -> Option<(PathBuf, String)> {
    let target = mount_point.to_str()?;
    // The last matching entry is the one on top.
    mounts.lines().rev().find_map(|l| {
        let mut f = l.split_whitespace();
        let src = f.next()?;
        let dst = f.next()?;
        let fstype = f.next()?;
        (dst == target).then(|| (PathBuf::from(src), fstype.to_string()))
    })
}

/// Grows the ext4 filesystem mounted at `mount_point` to the whole of its block device.
/// Returns a short description of what was done.
pub fn grow_fs(mount_point: &Path) -> Result<String, String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map_err(|e| format!("reading /proc/self/mounts: {e}"))?;
    let (dev, fstype) = mount_source(&mounts, mount_point)
        .ok_or_else(|| format!("{} is not a mount point", mount_point.display()))?;
    if fstype != "ext4" {
        return Err(format!(
            "{} is {fstype}, only ext4 can be grown",
            mount_point.display()
        ));
    }
    let dev_file = File::open(&dev).map_err(|e| format!("opening {}: {e}", dev.display()))?;
    let mut dev_bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer; `dev_bytes` is a live,
    // properly aligned u64 for the whole call, and the fd is valid while `dev_file` lives.
    let rc = unsafe {
        libc::ioctl(
            dev_file.as_raw_fd(),
            BLKGETSIZE64,
            &mut dev_bytes as *mut u64,
        )
    };
    if rc != 0 {
        return Err(format!(
            "BLKGETSIZE64 on {}: {}",
            dev.display(),
            io::Error::last_os_error()
        ));
    }
    let dir =
        File::open(mount_point).map_err(|e| format!("opening {}: {e}", mount_point.display()))?;
    let block_size = dir
        .metadata()
        .map_err(|e| format!("stat {}: {e}", mount_point.display()))?
        .blksize();
    if block_size == 0 {
        return Err("filesystem reports block size 0".to_string());
    }
    let mut new_blocks: u64 = dev_bytes / block_size;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 (the new block count) through the pointer;
    // `new_blocks` is a live, aligned u64 for the whole call and `dir` is an open fd on the
    // filesystem to resize. The kernel validates the value (it refuses to shrink).
    let rc = unsafe {
        libc::ioctl(
            dir.as_raw_fd(),
            EXT4_IOC_RESIZE_FS,
            &mut new_blocks as *mut u64,
        )
    };
    if rc != 0 {
        return Err(format!(
            "EXT4_IOC_RESIZE_FS to {new_blocks} blocks of {block_size} bytes: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(format!(
        "{} on {} now spans {} MiB ({new_blocks} blocks)",
        mount_point.display(),
        dev.display(),
        dev_bytes >> 20
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_parsing() {
        assert!(cmdline_flag(
            "console=ttyS0 hatch.disk_grow=1 quiet",
            "hatch.disk_grow"
        ));
        assert!(!cmdline_flag(
            "console=ttyS0 hatch.disk_grow=0",
            "hatch.disk_grow"
        ));
        assert!(!cmdline_flag("hatch.disk_grow_x=1", "hatch.disk_grow"));
        assert!(!cmdline_flag("", "hatch.disk_grow"));
    }

    #[test]
    fn finds_mount_source() {
        let m = "proc /proc proc rw 0 0\n/dev/vda /mnt/disk ext4 rw,noatime 0 0\n";
        let (dev, fs) = mount_source(m, Path::new("/mnt/disk")).unwrap();
        assert_eq!(dev, PathBuf::from("/dev/vda"));
        assert_eq!(fs, "ext4");
        assert!(mount_source(m, Path::new("/mnt")).is_none());
    }
}
