//! Authenticating what Hatch wrote itself: snapshot manifests in S3 and the
//! description of each local copy. Whoever can write to the bucket (or to
//! the data dir) must not be able to make a daemon restore, fetch or launch
//! something it did not capture.
//!
//! A MAC is keyed BLAKE3 over the exact bytes of the body, with a key
//! derived from the snapshot secret (`HATCH_SNAPSHOT_SECRET`, shared by the
//! daemons that share a bucket). Each sealed object names the key it was
//! sealed with (`key_id`, derived from the secret, revealing nothing about
//! it), so rotation works: the current secret seals, previous secrets
//! (`HATCH_SNAPSHOT_SECRET_PREVIOUS`) still verify.

/// BLAKE3 key derivation contexts: globally unique, fixed forever.
const MAC_CONTEXT: &str = "hatch 2026-11-29 snapshot seal MAC key";
const ID_CONTEXT: &str = "hatch 2026-11-29 snapshot seal key id";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error(
        "sealed with key {0}, which this daemon does not hold (set HATCH_SNAPSHOT_SECRET to the secret of the daemon that wrote it, or list it in HATCH_SNAPSHOT_SECRET_PREVIOUS)"
    )]
    UnknownKey(String),
    #[error("its MAC does not match its content (forged or edited)")]
    Forged,
}

#[derive(Clone)]
struct MacKey {
    id: String,
    key: [u8; 32],
}

impl MacKey {
    fn new(secret: &[u8]) -> MacKey {
        let id = blake3::derive_key(ID_CONTEXT, secret);
        MacKey {
            id: hex(&id[..8]),
            key: blake3::derive_key(MAC_CONTEXT, secret),
        }
    }
}

/// The keys a daemon seals and verifies with.
#[derive(Clone)]
pub struct SealKeys {
    current: MacKey,
    previous: Vec<MacKey>,
}

impl std::fmt::Debug for SealKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealKeys")
            .field("current", &self.current.id)
            .field(
                "previous",
                &self.previous.iter().map(|k| &k.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A seal: which key, and the MAC (hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seal {
    pub key_id: String,
    pub mac: String,
}

impl SealKeys {
    pub fn new(current: &[u8], previous: &[&[u8]]) -> SealKeys {
        SealKeys {
            current: MacKey::new(current),
            previous: previous.iter().map(|s| MacKey::new(s)).collect(),
        }
    }

    /// The id of the key new seals are made with.
    pub fn current_id(&self) -> &str {
        &self.current.id
    }

    pub fn seal(&self, body: &[u8]) -> Seal {
        Seal {
            key_id: self.current.id.clone(),
            mac: blake3::keyed_hash(&self.current.key, body)
                .to_hex()
                .to_string(),
        }
    }

    pub fn verify(&self, seal: &Seal, body: &[u8]) -> Result<(), SealError> {
        let key = std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| k.id == seal.key_id)
            .ok_or_else(|| SealError::UnknownKey(seal.key_id.clone()))?;
        let expected = blake3::keyed_hash(&key.key, body);
        // blake3::Hash compares in constant time; a malformed MAC is simply
        // not equal.
        let presented =
            blake3::Hash::from_hex(seal.mac.as_bytes()).map_err(|_| SealError::Forged)?;
        if presented == expected {
            Ok(())
        } else {
            Err(SealError::Forged)
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_verify_only_with_the_key_and_the_content() {
        let keys = SealKeys::new(b"secret one", &[]);
        let seal = keys.seal(b"body");
        assert_eq!(keys.verify(&seal, b"body"), Ok(()));
        assert_eq!(keys.verify(&seal, b"bodY"), Err(SealError::Forged));
        let mut bad = seal.clone();
        bad.mac = "zz".into();
        assert_eq!(keys.verify(&bad, b"body"), Err(SealError::Forged));

        // Another secret: an unknown key, not a forgery that could match.
        let other = SealKeys::new(b"secret two", &[]);
        assert!(matches!(
            other.verify(&seal, b"body"),
            Err(SealError::UnknownKey(_))
        ));
        // A forger who names our key id without our key fails.
        let mut forged = other.seal(b"evil");
        forged.key_id = seal.key_id.clone();
        assert_eq!(keys.verify(&forged, b"evil"), Err(SealError::Forged));

        // Rotation: the new daemon seals with the new key, still reads old seals.
        let rotated = SealKeys::new(b"secret two", &[b"secret one"]);
        assert_eq!(rotated.verify(&seal, b"body"), Ok(()));
        assert_eq!(rotated.seal(b"x").key_id, other.current_id());
        assert!(!format!("{rotated:?}").contains("secret"));
    }
}
