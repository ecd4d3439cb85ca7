//! `hatch.touch_mib=N` on the kernel command line makes the guest fill N MiB
//! of its memory with incompressible data and keep it, so that benchmarks
//! measure snapshots of a VM with a realistic working set.

/// Fill and keep `mib` MiB; prints `hatch-guest: touched N MiB` when done.
pub fn touch(mib: usize) {
    // Seeded per boot, so that two VMs (or two benchmark runs) do not share
    // content that the snapshot store would deduplicate.
    let mut seed = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut seed);
    }
    // xorshift needs a non-zero state.
    let mut state = u64::from_ne_bytes(seed) | 1;
    let mut mem: Vec<u64> = Vec::with_capacity(mib * (1 << 20) / 8);
    for _ in 0..mem.capacity() {
        // xorshift64: cheap, and random enough that zstd cannot shrink it.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        mem.push(state);
    }
    eprintln!("hatch-guest: touched {mib} MiB");
    // Kept for the life of the process.
    std::mem::forget(mem);
}

pub fn requested(cmdline: &str) -> Option<usize> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("hatch.touch_mib="))
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_parameter() {
        assert_eq!(requested("quiet hatch.touch_mib=400"), Some(400));
        assert_eq!(requested("quiet"), None);
        assert_eq!(requested("hatch.touch_mib=x"), None);
    }
}
