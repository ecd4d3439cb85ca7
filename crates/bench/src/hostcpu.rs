//! CPU time the whole host spent busy over an interval, from `/proc/stat`.
//!
//! The herd is bounded by CPU: a round of wakes cannot end before the CPU
//! time it used, spread over every core, has passed. The benchmark measures
//! that time in the same run, so the floor it prints is a measurement, not
//! an estimate. It counts every process of the host (QEMUs, the daemon, the
//! proxy, the benchmark itself), which is why it needs the daemon on this
//! machine, as `scripts/bench.sh` runs it.

use std::time::Duration;

use anyhow::Context;

/// A reading of the host's busy and total CPU time.
#[derive(Clone, Copy)]
pub struct HostCpu {
    busy_ticks: u64,
}

impl HostCpu {
    pub fn now() -> anyhow::Result<HostCpu> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        Ok(HostCpu {
            busy_ticks: busy_ticks(&stat)?,
        })
    }

    /// Busy CPU time (all cores together) since this reading.
    pub fn busy_since(&self) -> anyhow::Result<Duration> {
        let now = HostCpu::now()?;
        let ticks = now.busy_ticks.saturating_sub(self.busy_ticks);
        Ok(Duration::from_secs_f64(ticks as f64 / USER_HZ))
    }
}

/// Cores the host has (what the floor divides by).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Busy ticks of the aggregate `cpu` line: every field but idle and iowait
/// (guest time is already inside user and nice).
fn busy_ticks(stat: &str) -> anyhow::Result<u64> {
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no cpu line")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("/proc/stat's cpu line is not numbers")?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    anyhow::ensure!(fields.len() >= 8, "/proc/stat's cpu line is too short");
    Ok(fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7])
}

/// /proc/stat's unit: 100 per second on every Linux architecture that
/// matters here, whatever the kernel's CONFIG_HZ.
const USER_HZ: f64 = 100.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_leaves_out_idle_and_iowait_and_guest() {
        let stat = "cpu  10 1 5 1000 7 2 3 4 9 9\ncpu0 1 1 1 1 1 1 1 1 0 0\n";
        assert_eq!(busy_ticks(stat).unwrap(), 10 + 1 + 5 + 2 + 3 + 4);
    }

    #[test]
    fn a_malformed_line_is_an_error() {
        assert!(busy_ticks("cpu  1 2 x\n").is_err());
        assert!(busy_ticks("cpu  1 2 3\n").is_err());
        assert!(busy_ticks("intr 1\n").is_err());
    }
}
