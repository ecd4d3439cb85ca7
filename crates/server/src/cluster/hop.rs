//! The signed hop between nodes: a request one node forwards to another
//! carries `X-Hatch-Hop: <from-node> <unix-seconds> <mac>`, where the MAC is
//! BLAKE3 keyed with a key derived from `HATCH_CLUSTER_SECRET` over the
//! sender, the time and the request's host. The receiver serves it only if
//! the MAC verifies and the time is within [`MAX_SKEW`], and never forwards
//! it again (one hop at most, so stale ownership cannot make a loop).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderName, HeaderValue};

use crate::config::Secret;

pub const HEADER: HeaderName = HeaderName::from_static("x-hatch-hop");

/// How far the sender's clock may be from the receiver's (and how long a
/// captured header could be replayed, for the same host only).
pub const MAX_SKEW: Duration = Duration::from_secs(30);

/// Signs and checks hops with the cluster's shared secret.
#[derive(Clone)]
pub struct HopKey {
    key: [u8; 32],
    /// This node's name (the sender of what it signs).
    node: String,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HopError {
    #[error("no X-Hatch-Hop header: this address only serves other nodes")]
    Missing,
    #[error("malformed X-Hatch-Hop header")]
    Malformed,
    #[error("the hop's time is more than {} s off this node's clock", MAX_SKEW.as_secs())]
    Stale,
    #[error(
        "the hop's signature does not verify (is HATCH_CLUSTER_SECRET the same on every node?)"
    )]
    BadSignature,
}

impl HopKey {
    pub fn new(secret: &Secret, node: &str) -> HopKey {
        HopKey {
            key: blake3::derive_key("hatch cluster hop 2026-11", secret.expose().as_bytes()),
            node: node.to_string(),
        }
    }

    fn mac(&self, from: &str, at: u64, host: &str) -> blake3::Hash {
        blake3::keyed_hash(&self.key, format!("{from}\n{at}\n{host}").as_bytes())
    }

    /// The header for a request to `host` forwarded by this node now.
    pub fn sign(&self, host: &str) -> (HeaderName, HeaderValue) {
        self.sign_at(host, unix_now())
    }

    fn sign_at(&self, host: &str, at: u64) -> (HeaderName, HeaderValue) {
        let value = format!(
            "{} {at} {}",
            self.node,
            self.mac(&self.node, at, host).to_hex()
        );
        // Node names and hex digits are visible ASCII: always a valid value.
        let value = HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("invalid"));
        (HEADER, value)
    }

    /// Check a hop for a request to `host`; answers the sending node.
    pub fn verify(&self, header: Option<&HeaderValue>, host: &str) -> Result<String, HopError> {
        self.verify_at(header, host, unix_now())
    }

    fn verify_at(
        &self,
        header: Option<&HeaderValue>,
        host: &str,
        now: u64,
    ) -> Result<String, HopError> {
        let text = header
            .ok_or(HopError::Missing)?
            .to_str()
            .map_err(|_| HopError::Malformed)?;
        let mut parts = text.split(' ');
        let (Some(from), Some(at), Some(mac), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(HopError::Malformed);
        };
        let at: u64 = at.parse().map_err(|_| HopError::Malformed)?;
        let mac = blake3::Hash::from_hex(mac).map_err(|_| HopError::Malformed)?;
        if now.abs_diff(at) > MAX_SKEW.as_secs() {
            return Err(HopError::Stale);
        }
        // blake3::Hash compares in constant time.
        if self.mac(from, at, host) != mac {
            return Err(HopError::BadSignature);
        }
        Ok(from.to_string())
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hops_verify_only_with_the_secret_the_host_and_the_time() {
        let n2 = HopKey::new(&Secret::new("cluster-secret-0123456789"), "n2");
        let n1 = HopKey::new(&Secret::new("cluster-secret-0123456789"), "n1");
        let stranger = HopKey::new(&Secret::new("another-secret-0123456789"), "n2");
        let (name, value) = n2.sign_at("app.localhost", 1000);
        assert_eq!(name, HEADER);
        assert_eq!(
            n1.verify_at(Some(&value), "app.localhost", 1010),
            Ok("n2".to_string())
        );
        assert_eq!(
            n1.verify_at(Some(&value), "other.localhost", 1010),
            Err(HopError::BadSignature),
            "bound to the host"
        );
        assert_eq!(
            n1.verify_at(Some(&value), "app.localhost", 1031),
            Err(HopError::Stale)
        );
        assert_eq!(
            n1.verify_at(
                Some(&stranger.sign_at("app.localhost", 1000).1),
                "app.localhost",
                1000
            ),
            Err(HopError::BadSignature)
        );
        // Claiming to be another node breaks the MAC.
        let forged = value.to_str().unwrap().replacen("n2", "n3", 1);
        assert_eq!(
            n1.verify_at(
                Some(&HeaderValue::from_str(&forged).unwrap()),
                "app.localhost",
                1000
            ),
            Err(HopError::BadSignature)
        );
        assert_eq!(
            n1.verify_at(None, "app.localhost", 1000),
            Err(HopError::Missing)
        );
        for bad in ["", "n2 1000", "n2 x abc", "n2 1000 zz", "n2 1000 aa bb"] {
            assert_eq!(
                n1.verify_at(Some(&HeaderValue::from_static(bad)), "h", 1000),
                Err(HopError::Malformed),
                "{bad:?}"
            );
        }
    }
}
