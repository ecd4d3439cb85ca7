//! Fault injection for tests, so that every step of capture, upload and
//! restore can be cut short the way a crash or a failing component would.
//!
//! `HATCH_FAULTS` holds comma-separated rules `point[@vm-id][=action]`:
//! - `crash` (the default): the daemon kills itself with SIGKILL at that
//!   point, as `kill -9` or a power cut would;
//! - `fail` / `fail:N`: the step fails with an error (every time, or the
//!   first N times);
//! - `delay:MS`: the step waits that long first (at points that ask with
//!   [`Faults::delay`]), so that a test can act inside a window that is
//!   otherwise too short to hit.
//!
//! The points are named where they are hit (`faults.hit("suspend.state_saved", vm)`)
//! and listed in docs/ARCHITECTURE.md. Unset in production: a check is one
//! look at an empty list.

use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
#[error("injected fault at {0}")]
pub struct InjectedFault(pub String);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Crash,
    /// Fail this many more times (None: always).
    Fail(Option<u32>),
    Delay(std::time::Duration),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    point: String,
    vm: Option<String>,
    action: Action,
}

impl Rule {
    fn matches(&self, point: &str, vm: &str) -> bool {
        self.point == point && self.vm.as_deref().is_none_or(|v| v == vm)
    }
}

#[derive(Debug, Default)]
pub struct Faults {
    rules: Mutex<Vec<Rule>>,
}

impl Faults {
    pub fn parse(spec: &str) -> Result<Faults, String> {
        let mut rules = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (target, action) = item.split_once('=').unwrap_or((item, "crash"));
            let (point, vm) = match target.split_once('@') {
                Some((p, vm)) => (p, Some(vm.to_string())),
                None => (target, None),
            };
            let action = match action.split_once(':') {
                None if action == "crash" => Action::Crash,
                None if action == "fail" => Action::Fail(None),
                Some(("fail", n)) => Action::Fail(Some(
                    n.parse()
                        .map_err(|_| format!("bad count in fault {item:?}"))?,
                )),
                Some(("delay", ms)) => Action::Delay(std::time::Duration::from_millis(
                    ms.parse()
                        .map_err(|_| format!("bad milliseconds in fault {item:?}"))?,
                )),
                _ => {
                    return Err(format!(
                        "unknown action in fault {item:?} (crash, fail, fail:N, delay:MS)"
                    ));
                }
            };
            if point.is_empty() {
                return Err(format!("fault {item:?} names no point"));
            }
            rules.push(Rule {
                point: point.to_string(),
                vm,
                action,
            });
        }
        Ok(Faults {
            rules: Mutex::new(rules),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Rule>> {
        self.rules.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long point `point` for VM `vm` is to wait (a `delay` rule).
    pub fn delay(&self, point: &str, vm: &str) -> Option<std::time::Duration> {
        let delay = self.lock().iter().find_map(|r| match r.action {
            Action::Delay(d) if r.matches(point, vm) => Some(d),
            _ => None,
        });
        if let Some(d) = delay {
            tracing::warn!(
                point,
                vm,
                ms = d.as_millis() as u64,
                "injected fault: delaying"
            );
        }
        delay
    }

    /// Pass point `point` for VM `vm`: crash here, fail, or go on.
    pub fn hit(&self, point: &str, vm: &str) -> Result<(), InjectedFault> {
        let mut rules = self.lock();
        let Some(rule) = rules.iter_mut().find(|r| r.matches(point, vm)) else {
            return Ok(());
        };
        match &mut rule.action {
            Action::Delay(_) => Ok(()),
            Action::Crash => {
                tracing::error!(point, vm, "injected fault: crashing");
                crash()
            }
            Action::Fail(Some(0)) => Ok(()),
            Action::Fail(left) => {
                if let Some(n) = left {
                    *n -= 1;
                }
                tracing::warn!(point, vm, "injected fault: failing");
                Err(InjectedFault(point.to_string()))
            }
        }
    }
}

/// Die at once, as `kill -9` would: no destructor, no flush, no cleanup.
fn crash() -> ! {
    // SAFETY: kill(2) on our own pid with SIGKILL has no memory-safety
    // preconditions; the process ends before it returns.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_point_and_vm_and_count_down() {
        let f = Faults::parse("a.b@vm-1=fail:2, c=fail").unwrap();
        assert!(f.hit("a.b", "vm-2").is_ok(), "other vm");
        assert!(f.hit("x", "vm-1").is_ok(), "other point");
        assert!(f.hit("a.b", "vm-1").is_err());
        assert!(f.hit("a.b", "vm-1").is_err());
        assert!(f.hit("a.b", "vm-1").is_ok(), "only twice");
        for _ in 0..5 {
            assert!(f.hit("c", "any").is_err());
        }
        assert!(Faults::parse("").unwrap().is_empty());
        let d = Faults::parse("s@vm-1=delay:1500").unwrap();
        assert_eq!(
            d.delay("s", "vm-1"),
            Some(std::time::Duration::from_millis(1500))
        );
        assert_eq!(d.delay("s", "vm-2"), None);
        assert!(d.hit("s", "vm-1").is_ok(), "a delay is no failure");
        for bad in ["p=explode", "=fail", "p=fail:x", "p=delay:soon"] {
            assert!(Faults::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Faults::parse("p").unwrap().lock()[0].action,
            Action::Crash,
            "crash is the default"
        );
    }
}
