//! Turning a bzImage into the uncompressed ELF `vmlinux` inside it.
//!
//! QEMU boots an ELF vmlinux that carries a PVH entry note directly in 64-bit mode: no
//! real-mode setup code, no BIOS calls and no in-guest decompression, which under TCG saves a
//! few hundred milliseconds of every cold boot.

use std::process::Command;

/// Offsets in the bzImage setup header (Documentation/arch/x86/boot.rst).
const SETUP_SECTS: usize = 0x1f1;
const HDRS_MAGIC: usize = 0x202;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;

const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;

fn u32_le(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// The compressed payload of a bzImage and the uncompressed size the kernel build appended
/// to it.
fn payload(bz: &[u8]) -> Result<(&[u8], usize), String> {
    if bz.get(HDRS_MAGIC..HDRS_MAGIC + 4) != Some(&b"HdrS"[..]) {
        return Err("not a bzImage (no HdrS magic)".into());
    }
    let setup_sects = match bz.get(SETUP_SECTS) {
        Some(0) => 4,
        Some(n) => usize::from(*n),
        None => return Err("truncated setup header".into()),
    };
    let off = u32_le(bz, PAYLOAD_OFFSET).ok_or("truncated setup header")? as usize;
    let len = u32_le(bz, PAYLOAD_LENGTH).ok_or("truncated setup header")? as usize;
    let start = (setup_sects + 1) * 512 + off;
    let data = bz
        .get(start..start.saturating_add(len))
        .ok_or("payload outside the file")?;
    if data.len() < 8 {
        return Err("payload too small".into());
    }
    // The build appends the uncompressed size (little endian u32) to the compressed data.
    let size = u32_le(data, data.len() - 4).ok_or("payload too small")? as usize;
    Ok((data, size))
}

/// Extracts the ELF vmlinux from a bzImage. LZ4 (what Debian uses) is decoded here; gzip,
/// xz, lzma, bzip2 and zstd payloads use the host tools. The result is checked against the
/// size recorded in the bzImage.
pub fn extract_vmlinux(bz: &[u8]) -> Result<Vec<u8>, String> {
    let (data, size) = payload(bz)?;
    let magic = &data[..6.min(data.len())];
    let out = if u32_le(data, 0) == Some(LZ4_LEGACY_MAGIC) {
        lz4_legacy_decompress(data, size)?
    } else {
        let (tool, args): (&str, &[&str]) = if magic.starts_with(&[0x1f, 0x8b]) {
            ("gzip", &["-dc"])
        } else if magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            ("xz", &["-dc", "--single-stream"])
        } else if magic.starts_with(&[0x5d, 0, 0]) {
            ("xz", &["-dc", "--format=lzma"])
        } else if magic.starts_with(b"BZh") {
            ("bzip2", &["-dc"])
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            ("zstd", &["-dc"])
        } else {
            return Err(format!("unknown payload compression (magic {magic:02x?})"));
        };
        decompress_with(tool, args, data)?
    };
    if out.len() != size {
        return Err(format!(
            "decompressed {} bytes, the bzImage says {size}",
            out.len()
        ));
    }
    if !out.starts_with(b"\x7fELF") {
        return Err("payload is not an ELF file".into());
    }
    Ok(out)
}

/// Runs `tool args` with `data` on stdin; trailing bytes (the size the build appends) can
/// make tools exit non-zero after writing everything, so the caller checks the size instead
/// of the exit status.
fn decompress_with(tool: &str, args: &[&str], data: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("running {tool}: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let input = data.to_vec();
    let writer = std::thread::spawn(move || {
        // A tool that stops reading early makes this fail with EPIPE; that is fine.
        let _ = stdin.write_all(&input);
    });
    let out = child
        .wait_with_output()
        .map_err(|e| format!("running {tool}: {e}"))?;
    let _ = writer.join();
    Ok(out.stdout)
}

/// Decodes the LZ4 "legacy" frame format (`lz4 -l`) used for compressed kernels: a magic
/// number, then blocks each prefixed by their compressed size. Stops at the end of the data
/// or at a trailing field that cannot be a block (the appended uncompressed size).
pub fn lz4_legacy_decompress(data: &[u8], size_hint: usize) -> Result<Vec<u8>, String> {
    if u32_le(data, 0) != Some(LZ4_LEGACY_MAGIC) {
        return Err("not an LZ4 legacy stream".into());
    }
    let mut out = Vec::with_capacity(size_hint);
    let mut pos = 4;
    while let Some(len) = u32_le(data, pos) {
        if len == LZ4_LEGACY_MAGIC {
            pos += 4;
            continue;
        }
        let len = len as usize;
        let Some(block) = data.get(pos + 4..(pos + 4).saturating_add(len)) else {
            break;
        };
        lz4_block(block, &mut out)?;
        pos += 4 + len;
    }
    Ok(out)
}

/// Decodes one LZ4 block, appending to `out` (matches may only reach into this block's
/// output, which is what legacy frames guarantee; reaching further back is still correct).
fn lz4_block(b: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    let mut i = 0;
    let err = |what: &str| format!("corrupt LZ4 block: {what}");
    while i < b.len() {
        let token = b[i];
        i += 1;
        let mut lit = usize::from(token >> 4);
        if lit == 15 {
            loop {
                let x = *b.get(i).ok_or_else(|| err("literal length"))?;
                i += 1;
                lit += usize::from(x);
                if x != 255 {
                    break;
                }
            }
        }
        let lits = b.get(i..i + lit).ok_or_else(|| err("literals"))?;
        out.extend_from_slice(lits);
        i += lit;
        if i >= b.len() {
            break;
        }
        let offset = usize::from(u16::from_le_bytes([
            *b.get(i).ok_or_else(|| err("offset"))?,
            *b.get(i + 1).ok_or_else(|| err("offset"))?,
        ]));
        i += 2;
        let mut mlen = usize::from(token & 15);
        if mlen == 15 {
            loop {
                let x = *b.get(i).ok_or_else(|| err("match length"))?;
                i += 1;
                mlen += usize::from(x);
                if x != 255 {
                    break;
                }
            }
        }
        mlen += 4;
        if offset == 0 || offset > out.len() {
            return Err(err("match offset"));
        }
        let from = out.len() - offset;
        if offset >= mlen {
            out.extend_from_within(from..from + mlen);
        } else {
            for k in 0..mlen {
                let c = out[from + k];
                out.push(c);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(blocks: &[&[u8]]) -> Vec<u8> {
        let mut v = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for b in blocks {
            v.extend_from_slice(&(b.len() as u32).to_le_bytes());
            v.extend_from_slice(b);
        }
        v
    }

    #[test]
    fn lz4_literals_and_overlapping_matches() {
        // "abc" then a match of 9 at offset 3 -> "abcabcabcabc", then literals "xy".
        let block: &[u8] = &[0x35, b'a', b'b', b'c', 3, 0, 0x20, b'x', b'y'];
        let mut data = frame(&[block]);
        // Trailing appended size, as in a bzImage payload.
        data.extend_from_slice(&14u32.to_le_bytes());
        let out = lz4_legacy_decompress(&data, 0).unwrap();
        assert_eq!(out, b"abcabcabcabcxy");
    }

    #[test]
    fn lz4_long_literal_length_and_bad_offset() {
        let lits = vec![7u8; 20];
        let mut block = vec![0xf0, 5];
        block.extend_from_slice(&lits);
        assert_eq!(lz4_legacy_decompress(&frame(&[&block]), 0).unwrap(), lits);
        let bad: &[u8] = &[0x10, b'a', 9, 0];
        assert!(lz4_legacy_decompress(&frame(&[bad]), 0).is_err());
    }

    #[test]
    fn rejects_non_bzimage() {
        assert!(extract_vmlinux(&[0u8; 4096]).is_err());
    }
}
