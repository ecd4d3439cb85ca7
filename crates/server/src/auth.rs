//! API keys: generated or taken from `HATCH_API_KEY`, stored only as BLAKE3
//! hashes, compared in constant time.

use std::sync::{Arc, RwLock};

use rand::Rng;
use rand::distributions::Alphanumeric;
use subtle::ConstantTimeEq;

use crate::config::Secret;
use crate::error::ApiError;
use crate::manager::{new_id, now_rfc3339};
use crate::model::{ApiKey, CreatedApiKey};
use crate::state::{ApiKeyRecord, StateStore};

pub const KEY_PREFIX: &str = "hatch_";

/// A new random key: 32 alphanumeric characters (~190 bits).
pub fn generate_key() -> String {
    let body: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    format!("{KEY_PREFIX}{body}")
}

pub fn hash_key(key: &str) -> [u8; 32] {
    *blake3::hash(key.as_bytes()).as_bytes()
}

/// The accepted keys: hashes loaded from the database, reloaded whenever a
/// key is created or revoked, so a revoked key is refused at once.
pub struct KeyRing {
    store: Arc<dyn StateStore>,
    hashes: RwLock<Vec<[u8; 32]>>,
}

/// Names of keys: what a person would type.
const MAX_NAME: usize = 63;

impl KeyRing {
    /// Load the keys and apply the rule for `HATCH_API_KEY`: the key it
    /// holds is valid while it is set; a start with another key, or none,
    /// revokes the previous one. If no key is left, one is generated and
    /// returned (to be shown once).
    ///
    /// With a `shared` store (a cluster) keys from other nodes'
    /// `HATCH_API_KEY` are not revoked: each node may set its own.
    pub async fn open(
        store: Arc<dyn StateStore>,
        env_key: Option<&Secret>,
        shared: bool,
    ) -> Result<(KeyRing, Option<String>), ApiError> {
        let env_hash = env_key.map(|k| hash_key(k.expose()));
        if let Some(key) = env_key {
            if key.expose().len() < 16 {
                return Err(ApiError::invalid(
                    "HATCH_API_KEY must be at least 16 characters",
                ));
            }
            store
                .insert_api_key(&ApiKeyRecord {
                    id: new_id("key"),
                    hash: hash_key(key.expose()).to_vec(),
                    name: Some("HATCH_API_KEY".into()),
                    source: "env".into(),
                    created_at: now_rfc3339(),
                })
                .await?;
        }
        let revoked = if shared {
            0
        } else {
            store
                .revoke_env_keys_except(env_hash.as_ref().map(|h| h.as_slice()))
                .await?
        };
        if revoked > 0 {
            tracing::info!(revoked, "revoked API keys from an earlier HATCH_API_KEY");
        }
        let ring = KeyRing {
            store,
            hashes: RwLock::new(Vec::new()),
        };
        ring.reload().await?;
        if !ring.lock().is_empty() {
            return Ok((ring, None));
        }
        let key = generate_key();
        ring.store
            .insert_api_key(&ApiKeyRecord {
                id: new_id("key"),
                hash: hash_key(&key).to_vec(),
                name: Some("generated".into()),
                source: "generated".into(),
                created_at: now_rfc3339(),
            })
            .await?;
        ring.reload().await?;
        Ok((ring, Some(key)))
    }

    fn lock(&self) -> std::sync::RwLockReadGuard<'_, Vec<[u8; 32]>> {
        self.hashes.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Read the keys again (in a cluster, every second: keys made or
    /// revoked through another node take effect here too).
    pub async fn reload(&self) -> Result<(), ApiError> {
        let hashes = self
            .store
            .api_keys()
            .await?
            .into_iter()
            .filter_map(|k| <[u8; 32]>::try_from(k.hash.as_slice()).ok())
            .collect();
        *self.hashes.write().unwrap_or_else(|p| p.into_inner()) = hashes;
        Ok(())
    }

    /// Whether `presented` is a valid key. Every stored hash is compared, each in
    /// constant time, so timing reveals neither which key nor how much matched.
    pub fn verify(&self, presented: &str) -> bool {
        let h = hash_key(presented);
        let mut ok = subtle::Choice::from(0);
        for stored in self.lock().iter() {
            ok |= stored.ct_eq(&h);
        }
        ok.into()
    }

    pub async fn list(&self) -> Result<Vec<ApiKey>, ApiError> {
        Ok(self
            .store
            .api_keys()
            .await?
            .into_iter()
            .map(public)
            .collect())
    }

    /// A new random key; the answer carries it, nothing else ever will.
    pub async fn create(&self, name: Option<String>) -> Result<CreatedApiKey, ApiError> {
        if let Some(n) = &name {
            let ok = !n.is_empty()
                && n.len() <= MAX_NAME
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return Err(ApiError::invalid(format!(
                    "invalid key name {n:?}: use 1-{MAX_NAME} letters, digits, '.', '_' or '-'"
                )));
            }
        }
        let key = generate_key();
        let rec = ApiKeyRecord {
            id: new_id("key"),
            hash: hash_key(&key).to_vec(),
            name,
            source: "api".into(),
            created_at: now_rfc3339(),
        };
        self.store.insert_api_key(&rec).await?;
        self.reload().await?;
        tracing::info!(key = %rec.id, name = rec.name.as_deref().unwrap_or(""), "API key created");
        Ok(CreatedApiKey {
            info: public(rec),
            key,
        })
    }

    /// Revoke key `id_or_name`; refused for the last key (nobody could
    /// call the API any more).
    pub async fn revoke(&self, id_or_name: &str) -> Result<ApiKey, ApiError> {
        let keys = self.store.api_keys().await?;
        let matches: Vec<_> = keys
            .iter()
            .filter(|k| k.id == id_or_name || k.name.as_deref() == Some(id_or_name))
            .collect();
        let rec = match matches.as_slice() {
            [one] => (*one).clone(),
            [] => return Err(ApiError::not_found("api key", id_or_name)),
            _ => {
                return Err(ApiError::conflict(format!(
                    "{} keys are named '{id_or_name}'; revoke one by id",
                    matches.len()
                )));
            }
        };
        if !self.store.delete_api_key_unless_last(&rec.id).await? {
            return Err(ApiError::conflict(format!(
                "key '{id_or_name}' is the only API key; create another first"
            )));
        }
        self.reload().await?;
        tracing::info!(key = %rec.id, "API key revoked");
        Ok(public(rec))
    }
}

fn public(k: ApiKeyRecord) -> ApiKey {
    ApiKey {
        id: k.id,
        name: k.name,
        source: k.source,
        created_at: k.created_at,
    }
}

/// Extract the token of an `Authorization: Bearer TOKEN` header value.
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::SqliteStore;

    fn db() -> (tempfile::TempDir, Arc<dyn StateStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("db")).unwrap());
        (dir, store)
    }

    #[tokio::test]
    async fn keys_verify_only_when_equal_and_are_stored_hashed() {
        let (_d, store) = db();
        let (ring, generated) = KeyRing::open(store.clone(), None, false).await.unwrap();
        let key = generated.expect("a first key is generated");
        assert!(key.starts_with(KEY_PREFIX) && key.len() == KEY_PREFIX.len() + 32);
        assert!(ring.verify(&key));
        assert!(!ring.verify(&format!("{key}x")));
        assert!(!ring.verify(""));
        let stored = store.api_keys().await.unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].hash, hash_key(&key).to_vec());
        assert!(
            !stored[0]
                .hash
                .windows(key.len())
                .any(|w| w == key.as_bytes())
        );
    }

    #[tokio::test]
    async fn created_keys_work_until_revoked_and_the_last_key_stays() {
        let (_d, store) = db();
        let env = Secret::new("env-key-0123456789");
        let (ring, generated) = KeyRing::open(store, Some(&env), false).await.unwrap();
        assert!(generated.is_none());
        let made = ring.create(Some("ci-bot".into())).await.unwrap();
        assert!(ring.verify(&made.key) && ring.verify(env.expose()));
        assert_eq!(ring.list().await.unwrap().len(), 2);
        assert!(ring.create(Some("bad name".into())).await.is_err());
        ring.revoke("ci-bot").await.unwrap();
        assert!(!ring.verify(&made.key), "revoked keys fail at once");
        let err = ring
            .revoke(&ring.list().await.unwrap()[0].id)
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::Conflict(_)), "{err}");
        assert!(matches!(
            ring.revoke("nope").await,
            Err(ApiError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn a_changed_environment_key_revokes_the_old_one() {
        let (_d, store) = db();
        let old = Secret::new("old-env-key-0123456789");
        let new = Secret::new("new-env-key-0123456789");
        let (ring, _) = KeyRing::open(store.clone(), Some(&old), false)
            .await
            .unwrap();
        let api = ring.create(None).await.unwrap();
        drop(ring);
        let (ring, _) = KeyRing::open(store.clone(), Some(&new), false)
            .await
            .unwrap();
        assert!(!ring.verify(old.expose()), "the previous HATCH_API_KEY");
        assert!(ring.verify(new.expose()) && ring.verify(&api.key));
        drop(ring);
        // Unset: the environment key goes too; keys made through the API stay.
        let (ring, generated) = KeyRing::open(store, None, false).await.unwrap();
        assert!(generated.is_none());
        assert!(!ring.verify(new.expose()) && ring.verify(&api.key));
        assert!(
            KeyRing::open(
                Arc::new(
                    SqliteStore::open(&tempfile::tempdir().unwrap().path().join("d")).unwrap()
                ),
                Some(&Secret::new("short")),
                false
            )
            .await
            .is_err()
        );
    }

    #[test]
    fn parses_bearer_headers() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearer"), None);
    }
}
