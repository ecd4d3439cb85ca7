//! Garbage collection and the bucket locks, with two `ChunkStore`s on one
//! in-memory object store standing in for two daemons sharing a bucket.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hatch_chunks::{CHUNK_SIZE, ChunkError, ChunkStore, FileChunks};
use object_store::ObjectStore;
use object_store::memory::InMemory;
use rand::RngCore;

const GRACE_NONE: Duration = Duration::ZERO;

fn two_daemons() -> (ChunkStore, ChunkStore) {
    let bucket: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    (
        ChunkStore::new(bucket.clone(), ""),
        ChunkStore::new(bucket, ""),
    )
}

fn random_file(dir: &std::path::Path, name: &str, chunks: usize) -> std::path::PathBuf {
    let mut data = vec![0u8; chunks * CHUNK_SIZE as usize];
    rand::thread_rng().fill_bytes(&mut data);
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    path
}

/// A "manifest" for these tests: the JSON list of chunk ids.
fn manifest(chunks: &FileChunks) -> Bytes {
    Bytes::from(serde_json::to_vec(&chunks.ids().collect::<Vec<_>>()).unwrap())
}

fn references(_key: &str, bytes: &[u8]) -> Result<Vec<String>, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

async fn gc(store: &ChunkStore, grace: Duration) -> Result<hatch_chunks::GcReport, ChunkError> {
    store
        .collect_garbage(
            "test",
            &["manifests/", "images/"],
            1 << 20,
            references,
            grace,
        )
        .await
}

/// Upload a file and its manifest under an upload lock, as Hatch does.
async fn snapshot(store: &ChunkStore, file: &std::path::Path, key: &str) -> FileChunks {
    let lock = store.lock_for_upload("test").await.unwrap();
    let (chunks, _) = store.upload_file(file).await.unwrap();
    store.put(key, manifest(&chunks)).await.unwrap();
    lock.release().await;
    chunks
}

#[tokio::test]
async fn collection_deletes_only_unreferenced_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = two_daemons();
    let kept = snapshot(&a, &random_file(dir.path(), "a", 2), "manifests/a").await;
    let gone = snapshot(&a, &random_file(dir.path(), "b", 3), "manifests/b").await;
    a.delete("manifests/b").await.unwrap();
    // Every prefix given keeps what its manifests name.
    let image = snapshot(&a, &random_file(dir.path(), "c", 1), "images/c").await;

    // Young garbage survives a grace period.
    let r = gc(&a, Duration::from_secs(3600)).await.unwrap();
    assert_eq!(
        (r.manifests, r.chunks, r.deleted_chunks, r.kept_young),
        (2, 6, 0, 3)
    );

    let r = gc(&a, GRACE_NONE).await.unwrap();
    assert_eq!((r.chunks, r.deleted_chunks), (6, 3));
    let out = dir.path().join("out");
    a.download_file(&kept, &out).await.unwrap();
    a.download_file(&image, &out).await.unwrap();
    let err = a.download_file(&gone, &out).await.unwrap_err();
    assert!(matches!(err, ChunkError::Missing { .. }), "{err:?}");
}

#[tokio::test]
async fn an_unreadable_manifest_stops_the_collection() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = two_daemons();
    let chunks = snapshot(&a, &random_file(dir.path(), "a", 1), "manifests/a").await;
    a.put("manifests/bad", Bytes::from_static(b"{not json"))
        .await
        .unwrap();
    a.put("manifests/huge", Bytes::from(vec![b' '; 2 << 20]))
        .await
        .unwrap();
    let err = gc(&a, GRACE_NONE).await.unwrap_err();
    assert!(
        matches!(
            err,
            ChunkError::Corrupt { .. } | ChunkError::TooLarge { .. }
        ),
        "{err:?}"
    );
    a.download_file(&chunks, &dir.path().join("out"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_collection_waits_for_uploads_of_every_daemon() {
    let (a, b) = two_daemons();
    let upload = b.lock_for_upload("b").await.unwrap();
    let err = gc(&a, GRACE_NONE).await.unwrap_err();
    assert!(
        matches!(err, ChunkError::Locked(ref h) if h.starts_with("upload-")),
        "{err:?}"
    );
    // Another upload may run alongside.
    let second = a.lock_for_upload("a").await.unwrap();
    second.release().await;
    upload.release().await;
    gc(&a, GRACE_NONE).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_upload_waits_for_a_collection_to_finish() {
    let (a, b) = two_daemons();
    let collection = a.lock_for_gc("a").await.unwrap();
    let waiting = tokio::spawn(async move { b.lock_for_upload("b").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!waiting.is_finished(), "the upload must wait");
    collection.release().await;
    waiting.await.unwrap().unwrap();

    // A collection that never ends makes uploads fail (their caller retries).
    let (a, b) = two_daemons();
    let _held = a.lock_for_gc("a").await.unwrap();
    let err = b.lock_for_upload("b").await.unwrap_err();
    assert!(
        matches!(err, ChunkError::Locked(ref h) if h.starts_with("gc-")),
        "{err:?}"
    );
}

/// Daemon B caches that a chunk is stored; daemon A's collection deletes it
/// (no manifest referenced it any more). B's next upload of the same data
/// must store the chunk again, not trust its cache.
#[tokio::test]
async fn an_upload_after_another_daemons_collection_does_not_trust_its_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_daemons();
    let file = random_file(dir.path(), "f", 2);
    snapshot(&b, &file, "manifests/first").await;
    b.delete("manifests/first").await.unwrap();
    let r = gc(&a, GRACE_NONE).await.unwrap();
    assert_eq!(r.deleted_chunks, 2);

    let chunks = snapshot(&b, &file, "manifests/second").await;
    a.download_file(&chunks, &dir.path().join("out"))
        .await
        .unwrap();
}

/// A lock whose holder died (not refreshed for 10 minutes) blocks nobody.
#[tokio::test]
async fn stale_locks_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let fs = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
    let store = ChunkStore::new(Arc::new(fs), "");
    let locks = dir.path().join("locks");
    std::fs::create_dir_all(&locks).unwrap();
    let dead = locks.join("upload-dead.json");
    std::fs::write(&dead, b"{}").unwrap();
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&dead)
        .unwrap()
        .set_modified(hour_ago)
        .unwrap();
    let lock = store.lock_for_gc("a").await.unwrap();
    lock.release().await;

    // A fresh one does block.
    std::fs::write(locks.join("upload-live.json"), b"{}").unwrap();
    let err = store.lock_for_gc("a").await.unwrap_err();
    assert!(
        matches!(err, ChunkError::Locked(ref h) if h == "upload-live.json"),
        "{err:?}"
    );
}
