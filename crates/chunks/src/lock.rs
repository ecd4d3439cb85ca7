//! Locks kept in the bucket, so that garbage collection never runs while an
//! upload of any daemon sharing the bucket is between "this chunk is stored
//! already, skip it" and "the manifest that references it is written".
//!
//! Protocol (it needs a store with read-after-write and list-after-write
//! consistency, which AWS S3, Garage, MinIO and R2 provide): a holder first
//! writes its own lock object under `locks/`, then lists `locks/`.
//! - Uploads share the bucket: an upload that sees a collection's lock
//!   removes its own and waits.
//! - A collection is exclusive: it goes ahead only if it sees no other lock.
//!
//! Both write before they list, so of an upload and a collection starting at
//! the same moment at least one sees the other and backs off. A held lock is
//! rewritten every [`REFRESH_EVERY`]; a lock not rewritten for
//! [`STALE_AFTER`] belongs to a holder that died and is ignored. Ages are
//! judged by the store's clock (the last-modified time of the lock just
//! written), never by comparing our clock with the store's.
//!
//! Chunks this process knows to be stored are cached to save a HEAD request
//! each. A collection writes a new epoch marker before it deletes anything;
//! an upload that takes its lock and finds another epoch than the one its
//! cache was filled in forgets the cache.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::Serialize;

use crate::{ChunkError, ChunkStore};

/// How often a held lock is rewritten.
pub const REFRESH_EVERY: Duration = Duration::from_secs(60);
/// A lock older than this (by the store's clock) is a dead holder's.
pub const STALE_AFTER: Duration = Duration::from_secs(600);
/// Longest an upload waits for a collection to finish before it fails (and
/// is retried later by its caller).
pub const UPLOAD_LOCK_WAIT: Duration = Duration::from_secs(120);

/// Key of the garbage collection epoch marker, relative to the prefix.
pub(crate) const EPOCH_KEY: &str = "gc/epoch";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LockKind {
    Upload,
    Gc,
}

impl LockKind {
    fn as_str(self) -> &'static str {
        match self {
            LockKind::Upload => "upload",
            LockKind::Gc => "gc",
        }
    }
}

#[derive(Serialize)]
struct LockBody<'a> {
    kind: LockKind,
    owner: &'a str,
}

/// A held lock; released by [`BucketLock::release`], or in the background
/// when dropped.
pub struct BucketLock {
    store: Arc<dyn ObjectStore>,
    path: ObjPath,
    refresher: Option<tokio::task::JoinHandle<()>>,
    /// When the lock object was last written.
    refreshed: Arc<std::sync::Mutex<tokio::time::Instant>>,
    /// When the lock was taken, by the store's clock (unix seconds).
    pub(crate) taken_at: i64,
    released: bool,
}

impl std::fmt::Debug for BucketLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketLock")
            .field("path", &self.path.as_ref())
            .finish()
    }
}

/// A held lock older than this (not rewritten since) may already count as
/// a dead holder's for others: work that relies on it must not go on.
const TRUST_FOR: Duration = Duration::from_secs(STALE_AFTER.as_secs() * 2 / 3);

impl BucketLock {
    /// Fails if the lock object was not rewritten recently enough for
    /// others to still honour it (its refreshes failed): then a collection
    /// may be running, and what the holder did under it cannot be trusted.
    pub fn check_held(&self) -> Result<(), ChunkError> {
        let age = self
            .refreshed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed();
        if age > TRUST_FOR {
            return Err(ChunkError::Locked(format!(
                "our lock {} was not refreshed for {} s",
                self.path,
                age.as_secs()
            )));
        }
        Ok(())
    }

    /// Remove the lock object, after the refresher has stopped (so that a
    /// refresh in flight cannot write it again afterwards).
    pub async fn release(mut self) {
        self.released = true;
        if let Some(r) = self.refresher.take() {
            r.abort();
            let _ = r.await;
        }
        if let Err(e) = self.store.delete(&self.path).await {
            // It goes stale and is ignored after STALE_AFTER.
            tracing::warn!(lock = %self.path, error = %e, "could not remove a bucket lock");
        }
    }
}

impl Drop for BucketLock {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let (store, path, refresher) =
            (self.store.clone(), self.path.clone(), self.refresher.take());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Some(r) = refresher {
                    r.abort();
                    let _ = r.await;
                }
                let _ = store.delete(&path).await;
            });
        } else if let Some(r) = refresher {
            r.abort();
        }
    }
}

impl ChunkStore {
    /// Take a shared upload lock, waiting (up to [`UPLOAD_LOCK_WAIT`]) while
    /// a collection holds the bucket. Hold it from the first chunk upload
    /// until the manifest is written.
    pub async fn lock_for_upload(&self, owner: &str) -> Result<BucketLock, ChunkError> {
        let deadline = tokio::time::Instant::now() + UPLOAD_LOCK_WAIT;
        let mut pause = Duration::from_millis(250);
        loop {
            match self.try_lock(LockKind::Upload, owner).await? {
                Ok(lock) => {
                    self.check_epoch().await?;
                    return Ok(lock);
                }
                Err(holder) if tokio::time::Instant::now() + pause < deadline => {
                    tracing::debug!(%holder, "upload waits for garbage collection");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(holder) => return Err(ChunkError::Locked(holder)),
            }
        }
    }

    /// Take the exclusive collection lock, or fail at once with
    /// [`ChunkError::Locked`] if any upload or collection holds the bucket.
    pub async fn lock_for_gc(&self, owner: &str) -> Result<BucketLock, ChunkError> {
        self.try_lock(LockKind::Gc, owner)
            .await?
            .map_err(ChunkError::Locked)
    }

    /// One attempt: write our lock, list the others. `Ok(Err(holder))` names
    /// a lock that conflicts with ours (ours is removed again).
    async fn try_lock(
        &self,
        kind: LockKind,
        owner: &str,
    ) -> Result<Result<BucketLock, String>, ChunkError> {
        let key = format!(
            "locks/{}-{:016x}.json",
            kind.as_str(),
            rand::random::<u64>()
        );
        let path = self.path(&key);
        let body = serde_json::to_vec(&LockBody { kind, owner })
            .map_err(|e| ChunkError::Task(e.to_string()))?;
        let body = Bytes::from(body);
        let store_err = |key: &str| {
            let key = key.to_string();
            move |source| ChunkError::Store { key, source }
        };
        self.store
            .put(&path, PutPayload::from_bytes(body.clone()))
            .await
            .map_err(store_err(&key))?;
        let listed = match self.list_meta("locks/").await {
            Ok(l) => l,
            Err(e) => {
                // Not left behind: a stray gc lock would block every upload.
                let _ = self.store.delete(&path).await;
                return Err(e);
            }
        };
        let now = match listed.iter().find(|m| m.location == path) {
            Some(own) => own.last_modified.timestamp(),
            // Not listed although just written: the store is not consistent
            // enough to lock on; treat it as a conflict.
            None => {
                let _ = self.store.delete(&path).await;
                return Ok(Err("the store did not list a lock just written".into()));
            }
        };
        let conflict = listed.iter().find(|m| {
            let name = m.location.filename().unwrap_or_default();
            let fresh = now - m.last_modified.timestamp() < STALE_AFTER.as_secs() as i64;
            let conflicts = match kind {
                LockKind::Gc => true,
                LockKind::Upload => name.starts_with("gc-"),
            };
            m.location != path && fresh && conflicts
        });
        if let Some(other) = conflict {
            let holder = other.location.filename().unwrap_or_default().to_string();
            let _ = self.store.delete(&path).await;
            return Ok(Err(holder));
        }
        let (store, refresh_path) = (self.store.clone(), path.clone());
        let refreshed = Arc::new(std::sync::Mutex::new(tokio::time::Instant::now()));
        let last = refreshed.clone();
        let refresher = tokio::spawn(async move {
            loop {
                tokio::time::sleep(REFRESH_EVERY).await;
                match store
                    .put(&refresh_path, PutPayload::from_bytes(body.clone()))
                    .await
                {
                    Ok(_) => {
                        *last.lock().unwrap_or_else(|p| p.into_inner()) =
                            tokio::time::Instant::now()
                    }
                    Err(e) => {
                        tracing::warn!(lock = %refresh_path, error = %e, "could not refresh a bucket lock")
                    }
                }
            }
        });
        Ok(Ok(BucketLock {
            store: self.store.clone(),
            path,
            refresher: Some(refresher),
            refreshed,
            taken_at: now,
            released: false,
        }))
    }

    /// Under an upload lock: if a collection ran since the cache of stored
    /// chunks was filled, forget the cache.
    async fn check_epoch(&self) -> Result<(), ChunkError> {
        let epoch = match self.get(EPOCH_KEY, 4096).await {
            Ok(b) => Some(b),
            Err(ChunkError::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => None,
            Err(e) => return Err(e),
        };
        let mut seen = self.gc_epoch.lock().unwrap_or_else(|p| p.into_inner());
        if *seen != epoch {
            self.forget_all();
            *seen = epoch;
        }
        Ok(())
    }
}
