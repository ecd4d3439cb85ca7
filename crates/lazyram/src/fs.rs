//! The FUSE side: a root directory holding one file, the RAM image.
//! Requests are answered from tasks on the server's runtime, so that a
//! read waiting for S3 does not hold up the others.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request,
};
use libc::{EIO, ENOENT, ENOTDIR};

use crate::cache::RamCache;
use crate::server::RAM_FILE;

const ROOT: u64 = fuser::FUSE_ROOT_ID;
const RAM: u64 = 2;
/// Attributes never change while mounted: the kernel may cache them long.
const TTL: Duration = Duration::from_secs(3600);
/// Reads and writes of up to a chunk in one request (the kernel lowers it
/// to what it allows).
const MAX_IO: u32 = 1 << 20;

pub(crate) struct RamFs {
    cache: Arc<RamCache>,
    rt: tokio::runtime::Handle,
    uid: u32,
    gid: u32,
}

impl RamFs {
    pub(crate) fn new(cache: Arc<RamCache>, rt: tokio::runtime::Handle) -> RamFs {
        // SAFETY: getuid/getgid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        RamFs {
            cache,
            rt,
            uid,
            gid,
        }
    }

    fn attr(&self, ino: u64) -> FileAttr {
        let (kind, perm, size, nlink) = if ino == ROOT {
            (FileType::Directory, 0o700, 0, 2)
        } else {
            (FileType::RegularFile, 0o600, self.cache.len(), 1)
        };
        let now = SystemTime::UNIX_EPOCH;
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

impl Filesystem for RamFs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        // Both are capped by the kernel; the values it took are fine.
        let _ = config.set_max_readahead(MAX_IO);
        let _ = config.set_max_write(MAX_IO);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        if parent == ROOT && name == RAM_FILE {
            reply.entry(&TTL, &self.attr(RAM), 0);
        } else {
            reply.error(ENOENT);
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match ino {
            ROOT | RAM => reply.attr(&TTL, &self.attr(ino)),
            _ => reply.error(ENOENT),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        if ino == RAM {
            // Keep the page cache across opens: it holds the guest's RAM.
            reply.opened(0, fuser::consts::FOPEN_KEEP_CACHE);
        } else {
            reply.error(ENOENT);
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyData,
    ) {
        if ino != RAM || offset < 0 {
            reply.error(EIO);
            return;
        }
        let cache = self.cache.clone();
        self.rt.spawn(async move {
            match cache.read(offset as u64, size).await {
                Ok(data) => reply.data(&data),
                Err(e) => {
                    tracing::error!(error = %e, "lazy RAM read failed");
                    reply.error(EIO)
                }
            }
        });
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyWrite,
    ) {
        if ino != RAM || offset < 0 {
            reply.error(EIO);
            return;
        }
        let (cache, data) = (self.cache.clone(), data.to_vec());
        self.rt.spawn(async move {
            match cache.write(offset as u64, data).await {
                Ok(n) => reply.written(n as u32),
                Err(e) => {
                    tracing::error!(error = %e, "lazy RAM write failed");
                    reply.error(EIO)
                }
            }
        });
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let cache = self.cache.clone();
        self.rt.spawn(async move {
            match cache.sync().await {
                Ok(()) => reply.ok(),
                Err(e) => {
                    tracing::error!(error = %e, "lazy RAM sync failed");
                    reply.error(EIO)
                }
            }
        });
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        if ino == ROOT {
            reply.opened(0, 0);
        } else {
            reply.error(ENOTDIR);
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            reply.error(ENOTDIR);
            return;
        }
        let entries = [
            (ROOT, FileType::Directory, OsStr::new(".")),
            (ROOT, FileType::Directory, OsStr::new("..")),
            (RAM, FileType::RegularFile, OsStr::new(RAM_FILE)),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(*ino, (i + 1) as i64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}
