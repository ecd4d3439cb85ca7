//! The sealed form of the documents Hatch keeps in the bucket (snapshot and
//! image manifests): the document as JSON text, and a MAC over exactly
//! those bytes, so that nothing is parsed into a trusted type before its
//! seal checks out.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::manifest::ManifestError;
use crate::seal::{Seal, SealKeys};

#[derive(Serialize, Deserialize)]
struct Envelope {
    format: String,
    version: u32,
    key_id: String,
    mac: String,
    manifest: Box<RawValue>,
}

/// `body` sealed in an envelope of `format` and `version`.
pub(crate) fn seal<T: Serialize>(
    format: &str,
    version: u32,
    body: &T,
    keys: &SealKeys,
) -> Result<Vec<u8>, serde_json::Error> {
    let body = serde_json::to_string(body)?;
    let seal = keys.seal(body.as_bytes());
    serde_json::to_vec(&Envelope {
        format: format.into(),
        version,
        key_id: seal.key_id,
        mac: seal.mac,
        manifest: RawValue::from_string(body)?,
    })
}

/// The authenticated body of an envelope of `format` and `version`.
pub(crate) fn open(
    bytes: &[u8],
    format: &str,
    version: u32,
    keys: &SealKeys,
) -> Result<Box<RawValue>, ManifestError> {
    let env: Envelope = serde_json::from_slice(bytes)
        .map_err(|e| ManifestError::Malformed(format!("not a version {version} {format}: {e}")))?;
    if env.format != format || env.version != version {
        return Err(ManifestError::Malformed(format!(
            "format {:?} version {} (expected {format:?} version {version})",
            env.format, env.version
        )));
    }
    let seal = Seal {
        key_id: env.key_id,
        mac: env.mac,
    };
    keys.verify(&seal, env.manifest.get().as_bytes())?;
    Ok(env.manifest)
}

/// The body of an envelope, not authenticated (garbage collection keeps
/// what any manifest names, whoever sealed it), and its format.
pub(crate) fn unverified(bytes: &[u8]) -> Result<(String, Value), String> {
    let env: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let body = match env.get("manifest") {
        Some(Value::String(raw)) => serde_json::from_str(raw).map_err(|e| e.to_string())?,
        Some(v) => v.clone(),
        None => return Err("no manifest in the envelope".into()),
    };
    let format = env["format"].as_str().unwrap_or_default().to_string();
    Ok((format, body))
}

/// The chunk ids of the chunk lists (`{"chunks": [id|null, …]}`) in `files`.
pub(crate) fn chunk_ids<'a>(
    files: impl IntoIterator<Item = &'a Value>,
) -> Result<Vec<String>, String> {
    let mut ids = Vec::new();
    for f in files {
        let list = f["chunks"]
            .as_array()
            .ok_or("a file without a chunk list")?;
        for c in list {
            match c {
                Value::Null => {}
                Value::String(id) if hatch_chunks::is_chunk_id(id) => ids.push(id.clone()),
                other => return Err(format!("bad chunk reference {other}")),
            }
        }
    }
    Ok(ids)
}
