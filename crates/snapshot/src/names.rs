//! The exact forms of the names Hatch writes. Anything read back from S3 or
//! the data dir that becomes a file name, an object key or a QEMU argument
//! is checked against them first.

/// Characters of the random part of an id (see `manager::new_id`).
const ID_BODY_LEN: usize = 12;

fn is_id(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|body| {
            body.len() == ID_BODY_LEN
                && body
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

pub fn is_vm_id(s: &str) -> bool {
    is_id(s, "vm")
}

pub fn is_snapshot_id(s: &str) -> bool {
    is_id(s, "snap")
}

/// An imported image's id (`img-…`), which names its manifest in S3.
pub fn is_image_id(s: &str) -> bool {
    is_id(s, "img")
}

/// A disk layer file of a VM: its first overlay `disk.qcow2`, or a layer
/// added by a capture or a restore, `layer-<id>.qcow2`.
pub fn is_layer_name(s: &str) -> bool {
    s == "disk.qcow2"
        || s.strip_suffix(".qcow2")
            .is_some_and(|stem| is_id(stem, "layer"))
}

/// A new random id: `prefix` and 12 characters of `[a-z0-9]`.
pub fn new_id(prefix: &str) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    let body: String = (0..12)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}-{body}")
}

/// A new disk layer's file name.
pub fn new_layer_name() -> String {
    format!("{}.qcow2", new_id("layer"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_exactly_what_hatch_writes() {
        assert!(is_vm_id(&new_id("vm")));
        assert!(is_snapshot_id(&new_id("snap")));
        assert!(is_layer_name(&new_layer_name()));
        assert!(is_layer_name("disk.qcow2"));
        for bad in [
            "",
            "vm-",
            "vm-abc",
            "vm-ABCDEFGHIJKL",
            "vm-abcdefghijk/",
            "vm-abcdefghijkl/../x",
            "snap-abcdefghijkl",
        ] {
            assert!(!is_vm_id(bad), "{bad}");
        }
        for bad in [
            "../disk.qcow2",
            "/etc/passwd",
            "layer-abcdefghijkl",
            "layer-abcdefghijkl.qcow2,file.driver=ssh",
            "disk.raw",
            "layer-../../x.qcow2",
        ] {
            assert!(!is_layer_name(bad), "{bad}");
        }
    }
}
