//! Making files durable in the right order. A captured file appears under
//! its final name only once its content is complete and on disk, and the
//! rename itself is made durable by syncing the directory: after a crash a
//! file either has its final name and full content, or is a `*.partial`
//! leftover that start-up sweeps away.

use std::io::Write;
use std::path::Path;

/// fsync a file's content.
pub fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// fsync a directory, making renames and creations in it durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// `path` with `.partial` appended: the name a file has while incomplete.
pub fn partial(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// Rename `from` to `to` and make the rename durable.
pub fn rename(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    match to.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// Write `bytes` to `path` atomically and durably: `<path>.partial`,
/// fsync, rename, fsync of the directory.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = partial(path);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    rename(&tmp, path)
}

/// Sync a file and then move it to its final name, durably.
pub fn commit(from: &Path, to: &Path) -> std::io::Result<()> {
    sync_file(from)?;
    rename(from, to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_appear_whole_under_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.json");
        write(&path, b"{}").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{}");
        assert!(!partial(&path).exists());
        assert_eq!(partial(&path), dir.path().join("f.json.partial"));
        std::fs::write(dir.path().join("a"), b"x").unwrap();
        commit(&dir.path().join("a"), &dir.path().join("b")).unwrap();
        assert!(dir.path().join("b").exists() && !dir.path().join("a").exists());
    }
}
