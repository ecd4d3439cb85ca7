//! API keys: generated or taken from `HATCH_API_KEY`, stored only as BLAKE3
//! hashes, compared in constant time.

use rand::Rng;
use rand::distributions::Alphanumeric;
use subtle::ConstantTimeEq;

use crate::db::Db;

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

/// The set of accepted key hashes, loaded once at start.
#[derive(Clone)]
pub struct KeyRing {
    hashes: Vec<[u8; 32]>,
}

impl KeyRing {
    pub fn load(db: &Db) -> Result<KeyRing, crate::db::DbError> {
        let hashes = db
            .api_key_hashes()?
            .into_iter()
            .filter_map(|h| <[u8; 32]>::try_from(h.as_slice()).ok())
            .collect();
        Ok(KeyRing { hashes })
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Whether `presented` is a valid key. Every stored hash is compared, each in
    /// constant time, so timing reveals neither which key nor how much matched.
    pub fn verify(&self, presented: &str) -> bool {
        let h = hash_key(presented);
        let mut ok = subtle::Choice::from(0);
        for stored in &self.hashes {
            ok |= stored.ct_eq(&h);
        }
        ok.into()
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

    #[test]
    fn keys_verify_only_when_equal() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let key = generate_key();
        assert!(key.starts_with(KEY_PREFIX) && key.len() == KEY_PREFIX.len() + 32);
        db.insert_api_key("k1", &hash_key(&key), "t").unwrap();
        let ring = KeyRing::load(&db).unwrap();
        assert!(ring.verify(&key));
        assert!(!ring.verify(&format!("{key}x")));
        assert!(!ring.verify(""));
        // The key itself is never stored.
        let stored = db.api_key_hashes().unwrap();
        assert_eq!(stored, vec![hash_key(&key).to_vec()]);
        assert!(!stored[0].windows(key.len()).any(|w| w == key.as_bytes()));
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
