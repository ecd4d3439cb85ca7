//! Which snapshots a retention policy deletes. A pure plan over the VM's
//! snapshots, newest first; the daemon carries it out (state store, S3,
//! local copies) under the VM's operation lock.

use std::time::SystemTime;

/// A VM's retention policy (`PUT /vms/{id}/retention`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    /// Keep this many finished snapshots.
    pub keep_last: Option<u32>,
    /// Delete finished snapshots older than this.
    pub max_age_seconds: Option<u64>,
}

/// One snapshot as the plan sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub id: &'a str,
    /// Ready or failed: done with, so a policy may delete it. Pending,
    /// capturing and uploading snapshots are neither counted nor deleted.
    pub finished: bool,
    /// It can be restored: ready in S3, or kept as a local copy.
    pub restorable: bool,
    /// When it was taken; `None` (unreadable) is never too old.
    pub created: Option<SystemTime>,
}

/// The ids `policy` deletes from `newest_first`. The newest restorable
/// snapshot is always kept, whatever the policy says: a VM never loses its
/// last way back.
pub fn plan<'a>(policy: Policy, newest_first: &[Candidate<'a>], now: SystemTime) -> Vec<&'a str> {
    if policy == Policy::default() {
        return Vec::new();
    }
    let keep = newest_first.iter().find(|c| c.restorable).map(|c| c.id);
    newest_first
        .iter()
        .filter(|c| c.finished)
        .enumerate()
        .filter(|(_, c)| Some(c.id) != keep)
        .filter(|(i, c)| {
            let beyond_count = policy.keep_last.is_some_and(|k| *i >= k as usize);
            let too_old = policy.max_age_seconds.is_some_and(|max| {
                c.created
                    .and_then(|t| now.duration_since(t).ok())
                    .is_some_and(|age| age.as_secs() > max)
            });
            beyond_count || too_old
        })
        .map(|(_, c)| c.id)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const NOW: Duration = Duration::from_secs(1_000_000);

    fn at(ago_secs: u64) -> Option<SystemTime> {
        Some(SystemTime::UNIX_EPOCH + NOW - Duration::from_secs(ago_secs))
    }

    fn ready(id: &str, ago_secs: u64) -> Candidate<'_> {
        Candidate {
            id,
            finished: true,
            restorable: true,
            created: at(ago_secs),
        }
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + NOW
    }

    fn keep_last(n: u32) -> Policy {
        Policy {
            keep_last: Some(n),
            max_age_seconds: None,
        }
    }

    #[test]
    fn no_policy_deletes_nothing() {
        let snaps = [ready("a", 10), ready("b", 1_000_000)];
        assert!(plan(Policy::default(), &snaps, now()).is_empty());
    }

    #[test]
    fn keep_last_deletes_the_oldest_finished_ones() {
        let snaps = [
            ready("e", 1),
            ready("d", 2),
            ready("c", 3),
            ready("b", 4),
            ready("a", 5),
        ];
        assert_eq!(plan(keep_last(2), &snaps, now()), ["c", "b", "a"]);
    }

    #[test]
    fn unfinished_snapshots_are_neither_counted_nor_deleted() {
        let uploading = Candidate {
            id: "up",
            finished: false,
            restorable: false,
            created: at(1),
        };
        let failed = Candidate {
            id: "failed",
            finished: true,
            restorable: false,
            created: at(3),
        };
        let snaps = [uploading, ready("b", 2), failed, ready("a", 4)];
        assert_eq!(plan(keep_last(1), &snaps, now()), ["failed", "a"]);
    }

    #[test]
    fn the_newest_restorable_snapshot_survives_any_policy() {
        let failed = Candidate {
            id: "failed",
            finished: true,
            restorable: false,
            created: at(100),
        };
        let old = Policy {
            keep_last: Some(1),
            max_age_seconds: Some(10),
        };
        // The failed one is newer and fills keep_last; the ready one is too
        // old; still it is the only way back.
        let snaps = [failed, ready("only", 1_000)];
        assert_eq!(plan(old, &snaps, now()), ["failed"]);
    }

    #[test]
    fn max_age_is_strictly_older_and_ignores_unreadable_times() {
        let policy = Policy {
            keep_last: None,
            max_age_seconds: Some(60),
        };
        let unknown = Candidate {
            id: "unknown",
            finished: true,
            restorable: true,
            created: None,
        };
        let snaps = [
            ready("new", 1),
            ready("edge", 60),
            ready("old", 61),
            unknown,
            ready("future", 0),
        ];
        assert_eq!(plan(policy, &snaps, now()), ["old"]);
    }
}
