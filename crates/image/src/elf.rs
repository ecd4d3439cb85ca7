//! Minimal ELF64 little-endian parsing: "is this executable static?" and a kernel module's
//! `.modinfo` section.

const PT_INTERP: u32 = 3;
const EM_X86_64: u16 = 62;

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

fn check_header(b: &[u8]) -> Result<(), String> {
    if b.len() < 64 || &b[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    if b[4] != 2 || b[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    Ok(())
}

/// Checks that `b` is an x86-64 executable without a program interpreter (statically linked,
/// including static-pie).
pub fn check_static_x86_64(b: &[u8]) -> Result<(), String> {
    check_header(b)?;
    if u16_at(b, 0x12) != Some(EM_X86_64) {
        return Err("not an x86-64 executable".into());
    }
    let phoff = u64_at(b, 0x20).ok_or("truncated header")? as usize;
    let phentsize = usize::from(u16_at(b, 0x36).ok_or("truncated header")?);
    let phnum = usize::from(u16_at(b, 0x38).ok_or("truncated header")?);
    if phnum == 0 {
        return Err("no program headers (not an executable)".into());
    }
    for i in 0..phnum {
        let p_type = u32_at(b, phoff + i * phentsize).ok_or("truncated program headers")?;
        if p_type == PT_INTERP {
            return Err("dynamically linked (has a program interpreter)".into());
        }
    }
    Ok(())
}

const PT_NOTE: u32 = 4;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the PVH entry point QEMU needs to boot an ELF vmlinux.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// True when `b` is an ELF64 kernel with a PVH entry note (bootable by QEMU `-kernel`
/// without decompression or real-mode setup).
pub fn has_pvh_note(b: &[u8]) -> bool {
    if check_header(b).is_err() {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (u64_at(b, 0x20), u16_at(b, 0x36), u16_at(b, 0x38))
    else {
        return false;
    };
    for i in 0..usize::from(phnum) {
        let h = phoff as usize + i * usize::from(phentsize);
        if u32_at(b, h) != Some(PT_NOTE) {
            continue;
        }
        let (Some(off), Some(size)) = (u64_at(b, h + 0x08), u64_at(b, h + 0x20)) else {
            continue;
        };
        let (off, size) = (off as usize, size as usize);
        let Some(notes) = b.get(off..off.saturating_add(size)) else {
            continue;
        };
        let mut p = 0usize;
        while p + 12 <= notes.len() {
            let (Some(namesz), Some(descsz), Some(ntype)) =
                (u32_at(notes, p), u32_at(notes, p + 4), u32_at(notes, p + 8))
            else {
                break;
            };
            let name_start = p + 12;
            let name_end = name_start + namesz as usize;
            let desc_start = name_start + (namesz as usize).next_multiple_of(4);
            if notes.get(name_start..name_end) == Some(&b"Xen\0"[..])
                && ntype == XEN_ELFNOTE_PHYS32_ENTRY
            {
                return true;
            }
            p = desc_start + (descsz as usize).next_multiple_of(4);
        }
    }
    false
}

/// The `key=value` entries of a kernel module's `.modinfo` section.
pub fn modinfo(b: &[u8]) -> Result<Vec<(String, String)>, String> {
    check_header(b)?;
    let shoff = u64_at(b, 0x28).ok_or("truncated header")? as usize;
    let shentsize = usize::from(u16_at(b, 0x3a).ok_or("truncated header")?);
    let shnum = usize::from(u16_at(b, 0x3c).ok_or("truncated header")?);
    let shstrndx = usize::from(u16_at(b, 0x3e).ok_or("truncated header")?);
    let section = |i: usize| -> Option<(u32, usize, usize)> {
        let h = shoff + i * shentsize;
        Some((
            u32_at(b, h)?,
            u64_at(b, h + 0x18)? as usize,
            u64_at(b, h + 0x20)? as usize,
        ))
    };
    let (_, stroff, strsize) = section(shstrndx).ok_or("bad section string table")?;
    let strtab = b
        .get(stroff..stroff.saturating_add(strsize))
        .ok_or("bad section string table")?;
    for i in 0..shnum {
        let (name_off, off, size) = section(i).ok_or("truncated section headers")?;
        let name = strtab
            .get(name_off as usize..)
            .and_then(|s| s.split(|c| *c == 0).next())
            .unwrap_or_default();
        if name == b".modinfo" {
            let data = b
                .get(off..off.saturating_add(size))
                .ok_or("truncated .modinfo")?;
            return Ok(data
                .split(|c| *c == 0)
                .filter_map(|e| {
                    let s = std::str::from_utf8(e).ok()?;
                    let (k, v) = s.split_once('=')?;
                    Some((k.to_string(), v.to_string()))
                })
                .collect());
        }
    }
    Err("no .modinfo section (not a kernel module)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_garbage() {
        assert!(check_static_x86_64(b"hello").is_err());
        assert!(modinfo(&[0u8; 100]).is_err());
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn host_binaries() {
        // The test binary itself is dynamically linked unless built with crt-static.
        let exe = std::env::current_exe().unwrap();
        let b = std::fs::read(exe).unwrap();
        let r = check_static_x86_64(&b);
        if cfg!(target_feature = "crt-static") {
            assert!(r.is_ok());
        } else {
            assert!(r.unwrap_err().contains("dynamically linked"));
        }
    }
}
