//! Progress of long operations on stderr, like `docker pull`: on a terminal
//! a spinner (a bar when the total is known) under one line per finished
//! phase; otherwise plain lines, one per phase change, so that logs and
//! scripts see them too. Results go to stdout, never here.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::output;

pub struct Progress {
    label: String,
    bar: Option<ProgressBar>,
    with_length: bool,
    start: Instant,
    phase_start: Instant,
    phase: Option<String>,
}

impl Progress {
    /// `label` names what is waited for, e.g. "snapshot snap-x".
    pub fn new(label: impl Into<String>) -> Progress {
        let label = label.into();
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(spinner_style());
            bar.set_message(label.clone());
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        let now = Instant::now();
        Progress {
            label,
            bar,
            with_length: false,
            start: now,
            phase_start: now,
            phase: None,
        }
    }

    /// The operation is in `phase`; `detail` (may be empty) follows it;
    /// `done_total` is (bytes done, bytes in all) when the API tells.
    pub fn update(&mut self, phase: &str, detail: &str, done_total: Option<(u64, u64)>) {
        let changed = self.phase.as_deref() != Some(phase);
        if changed {
            let now = Instant::now();
            match (&self.bar, &self.phase) {
                (Some(bar), Some(prev)) => bar.println(format!(
                    "{}: {prev} done in {}",
                    self.label,
                    output::elapsed(now - self.phase_start)
                )),
                (Some(_), None) => {}
                (None, _) => eprintln!(
                    "{}",
                    line(&self.label, phase, now - self.start, detail, done_total)
                ),
            }
            self.phase = Some(phase.to_string());
            self.phase_start = now;
        }
        let Some(bar) = &self.bar else {
            return;
        };
        let mut msg = format!("{}: {phase}", self.label);
        if !detail.is_empty() {
            msg.push_str(&format!(" ({detail})"));
        }
        bar.set_message(msg);
        match done_total {
            Some((done, total)) if total > 0 => {
                if !self.with_length {
                    bar.set_style(bar_style());
                    self.with_length = true;
                }
                bar.set_length(total);
                bar.set_position(done.min(total));
            }
            _ => {
                if self.with_length {
                    bar.set_style(spinner_style());
                    self.with_length = false;
                }
            }
        }
    }

    /// The operation ended in `phase`: one last line, in both modes.
    pub fn finish(mut self, phase: &str, detail: &str) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        eprintln!(
            "{}",
            line(&self.label, phase, self.start.elapsed(), detail, None)
        );
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// "snapshot snap-x: uploading [1.2s] memory 256.0 MiB, 12.0 MiB of 256.0 MiB"
pub fn line(
    label: &str,
    phase: &str,
    elapsed: Duration,
    detail: &str,
    done_total: Option<(u64, u64)>,
) -> String {
    let mut s = format!("{label}: {phase} [{}]", output::elapsed(elapsed));
    let mut parts: Vec<String> = Vec::new();
    if !detail.is_empty() {
        parts.push(detail.to_string());
    }
    if let Some((done, total)) = done_total.filter(|&(_, t)| t > 0) {
        parts.push(format!(
            "{} of {}",
            output::bytes(done.min(total)),
            output::bytes(total)
        ));
    }
    if !parts.is_empty() {
        s.push(' ');
        s.push_str(&parts.join(", "));
    }
    s
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{spinner} {msg} [{elapsed}] {wide_bar} {binary_bytes}/{binary_total_bytes}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_name_the_phase_time_and_bytes() {
        assert_eq!(
            line(
                "snapshot snap-x",
                "uploading",
                Duration::from_millis(1234),
                "memory 256.0 MiB",
                Some((12 << 20, 256 << 20))
            ),
            "snapshot snap-x: uploading [1.2s] memory 256.0 MiB, 12.0 MiB of 256.0 MiB"
        );
        assert_eq!(
            line("vm a", "running", Duration::from_secs(3), "", None),
            "vm a: running [3.0s]"
        );
        assert_eq!(
            line("vm a", "starting", Duration::ZERO, "", Some((0, 0))),
            "vm a: starting [0.0s]"
        );
    }
}
