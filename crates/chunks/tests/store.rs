//! The chunk store against a local-filesystem object store (a stand-in for
//! S3 here; the end-to-end tests run against a real Garage).

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use hatch_chunks::{CHUNK_SIZE, ChunkError, ChunkStore};
use object_store::local::LocalFileSystem;
use rand::RngCore;

fn setup() -> (tempfile::TempDir, ChunkStore) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("bucket")).unwrap();
    let fs = LocalFileSystem::new_with_prefix(dir.path().join("bucket")).unwrap();
    (dir, ChunkStore::new(Arc::new(fs), "t/"))
}

/// 4 chunks and a bit: random, zero, random, zero, short random tail.
fn sample(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
    let cs = CHUNK_SIZE as usize;
    let mut data = vec![0u8; 4 * cs + 1000];
    rand::thread_rng().fill_bytes(&mut data[..cs]);
    rand::thread_rng().fill_bytes(&mut data[2 * cs..3 * cs]);
    rand::thread_rng().fill_bytes(&mut data[4 * cs..]);
    let path = dir.join("file");
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

#[tokio::test]
async fn round_trip_skips_zero_chunks_and_dedups() {
    let (dir, store) = setup();
    let (path, data) = sample(dir.path());
    let (chunks, report) = store.upload_file(&path).await.unwrap();
    assert_eq!(report.chunks, 5);
    assert_eq!(report.zero_chunks, 2);
    assert_eq!(report.new_chunks, 3);
    assert!(
        report.stored_bytes > 2 * CHUNK_SIZE,
        "random data does not compress"
    );
    assert_eq!(chunks.chunks.iter().filter(|c| c.is_none()).count(), 2);

    let out = dir.path().join("restored");
    let dl = store.download_file(&chunks, &out).await.unwrap();
    assert_eq!(dl.chunks, 3);
    assert_eq!(std::fs::read(&out).unwrap(), data);

    // The same content again stores nothing, even from a fresh process view.
    let (fresh_dir, _) = (dir.path(), ());
    let fs = LocalFileSystem::new_with_prefix(fresh_dir.join("bucket")).unwrap();
    let fresh = ChunkStore::new(Arc::new(fs), "t/");
    let (again, report) = fresh.upload_file(&path).await.unwrap();
    assert_eq!(again, chunks);
    assert_eq!((report.new_chunks, report.stored_bytes), (0, 0));

    // One changed chunk uploads one chunk.
    let mut changed = data.clone();
    changed[2 * CHUNK_SIZE as usize + 7] ^= 0xff;
    std::fs::write(&path, &changed).unwrap();
    let (_, report) = store.upload_file(&path).await.unwrap();
    assert_eq!(report.new_chunks, 1);
}

#[tokio::test]
async fn corrupt_and_missing_chunks_are_detected() {
    let (dir, store) = setup();
    let (path, _) = sample(dir.path());
    let (chunks, _) = store.upload_file(&path).await.unwrap();
    let first = chunks.chunks[0].clone().unwrap();
    let object = dir
        .path()
        .join("bucket")
        .join(store.object_key(&store.chunk_key(&first)));

    // Valid zstd, wrong content.
    std::fs::write(&object, zstd::bulk::compress(b"not the data", 1).unwrap()).unwrap();
    let err = store
        .download_file(&chunks, &dir.path().join("out"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ChunkError::Corrupt { ref id, .. } if *id == first),
        "{err:?}"
    );
    assert!(err.is_corruption());

    // Garbage that is not zstd at all.
    std::fs::write(&object, b"garbage").unwrap();
    let err = store
        .download_file(&chunks, &dir.path().join("out"))
        .await
        .unwrap_err();
    assert!(matches!(err, ChunkError::Corrupt { .. }), "{err:?}");

    // A bomb: valid zstd of the right content's hash would need exactly the
    // chunk's size; 64 MiB of zeros must not be inflated into memory.
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).unwrap();
    std::fs::write(&object, bomb).unwrap();
    let err = store
        .download_file(&chunks, &dir.path().join("out"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ChunkError::Corrupt { ref reason, .. } if reason.contains("cannot decompress")),
        "{err:?}"
    );

    // An object larger than any chunk can be is refused before it is read.
    std::fs::write(&object, vec![7u8; 3 << 20]).unwrap();
    let err = store
        .download_file(&chunks, &dir.path().join("out"))
        .await
        .unwrap_err();
    assert!(matches!(err, ChunkError::TooLarge { .. }), "{err:?}");
    assert!(err.is_corruption());

    // Chunk lists that Hatch never writes are refused before any request.
    let mut hostile = chunks.clone();
    hostile.chunks[0] = Some("../../../etc/passwd".into());
    let err = store
        .download_file(&hostile, &dir.path().join("out"))
        .await
        .unwrap_err();
    assert!(matches!(err, ChunkError::InvalidChunks(_)), "{err:?}");

    std::fs::remove_file(&object).unwrap();
    let err = store
        .download_file(&chunks, &dir.path().join("out"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ChunkError::Missing { ref id } if *id == first),
        "{err:?}"
    );
}
