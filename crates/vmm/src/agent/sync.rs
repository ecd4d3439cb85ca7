//! The clock and RNG sync after a restore: `sync <secs>.<nanos> <seed hex>
//! <id>`, answered `ok <id> <guest clock>` or `error <id> <why>`.

use std::io::Read;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

use super::Agent;
use crate::VmmError;

/// What a confirmed sync tells.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Synced {
    /// Host time minus the guest's wall clock right after it was set, in
    /// seconds, when the guest reports it (older guests answer a bare `ok`).
    pub offset: Option<f64>,
}

impl Agent {
    /// Give the guest's outbound card the address `guest` (CIDR) with
    /// gateway `gateway`: after a restore the host's end may have moved.
    pub async fn set_network(
        &self,
        guest: &str,
        gateway: &str,
        timeout: Duration,
    ) -> Result<(), VmmError> {
        let id = self.next_id();
        let (tx, rx) = oneshot::channel();
        self.shared.table.lock().syncs.insert(id, tx);
        let exchange = async {
            self.send(format!("net {guest} {gateway} {id}\n")).await?;
            rx.await
                .map_err(|_| VmmError::Agent("the agent channel closed".into()))
        };
        let answer = tokio::time::timeout(timeout, exchange).await;
        self.shared.table.lock().syncs.remove(&id);
        match answer {
            Err(_) => Err(VmmError::Agent(format!(
                "the guest agent did not confirm its network within {} ms",
                timeout.as_millis()
            ))),
            Ok(Err(e)) => Err(e),
            Ok(Ok(Reply::Ok(_))) => Ok(()),
            Ok(Ok(Reply::Error(why))) => Err(VmmError::Agent(format!(
                "the guest could not set its network: {why}"
            ))),
        }
    }

    /// Set the guest's wall clock to the host's and reseed its RNG, waiting
    /// at most `timeout` for the guest's confirmation. Each request carries
    /// an id, so a late answer to an earlier attempt is never taken for
    /// this one's. The guest answers `ok <id> <its clock>`; the offset tells
    /// whether the clock it set is still right (a request the guest took
    /// seconds to read set a clock that many seconds behind).
    pub async fn sync_clock_and_rng(&self, timeout: Duration) -> Result<Synced, VmmError> {
        let mut seed = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .map_err(|source| VmmError::Io {
                path: "/dev/urandom".into(),
                source,
            })?;
        let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
        let id = self.next_id();
        let now = unix_now();
        let line = format!(
            "sync {}.{:09} {hex} {id}\n",
            now.as_secs(),
            now.subsec_nanos()
        );
        let (tx, rx) = oneshot::channel();
        self.shared.table.lock().syncs.insert(id, tx);
        let exchange = async {
            self.send(line).await?;
            // The channel itself broke (not a slow guest): callers connect again.
            rx.await.map_err(|_| VmmError::Io {
                path: "the guest agent channel".into(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the agent channel closed",
                ),
            })
        };
        let answer = tokio::time::timeout(timeout, exchange).await;
        // A late answer to this attempt finds no one waiting.
        self.shared.table.lock().syncs.remove(&id);
        let answer = answer.map_err(|_| {
            VmmError::Agent(format!(
                "the guest agent did not answer within {} ms",
                timeout.as_millis()
            ))
        })??;
        match answer {
            Reply::Ok(guest_clock) => Ok(Synced {
                offset: guest_clock.map(|g| unix_now().as_secs_f64() - g),
            }),
            Reply::Error(why) => Err(VmmError::Agent(format!("the guest agent failed: {why}"))),
        }
    }
}

#[derive(Debug, PartialEq)]
pub(super) enum Reply {
    /// The guest's clock after it was set, if it said.
    Ok(Option<f64>),
    Error(String),
}

/// The answer to request `id`: `ok <id> <secs.nanos>`, `error <id> <why>`,
/// or from guests that predate ids a bare `ok` / `error <why>`. None for an
/// answer to another request.
fn parse_reply(line: &str, id: u64) -> Option<Reply> {
    let mut words = line.splitn(3, ' ');
    let status = words.next()?;
    let second = words.next();
    let rest = words.next();
    let id_text = id.to_string();
    match (status, second) {
        ("ok", None) => Some(Reply::Ok(None)),
        ("ok", Some(i)) if i == id_text => Some(Reply::Ok(rest.and_then(|t| t.parse().ok()))),
        ("error", Some(i)) if i == id_text => Some(Reply::Error(rest.unwrap_or("").to_string())),
        ("error", Some(i)) if i.parse::<u64>().is_err() => {
            Some(Reply::Error(line.trim_start_matches("error ").to_string()))
        }
        _ => None,
    }
}

/// A sync answer and the request id it names (None from guests that
/// predate ids); None for lines that are not sync answers.
pub(super) fn parse_any_reply(line: &str) -> Option<(Option<u64>, Reply)> {
    let mut words = line.splitn(3, ' ');
    let status = words.next()?;
    if status != "ok" && status != "error" {
        return None;
    }
    let id = words.next().and_then(|w| w.parse::<u64>().ok());
    let reply = match id {
        Some(id) => parse_reply(line, id)?,
        None if status == "ok" => Reply::Ok(None),
        None => Reply::Error(line.trim_start_matches("error").trim_start().to_string()),
    };
    Some((id, reply))
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_matched_to_their_request() {
        assert_eq!(
            parse_reply("ok 3 1700000000.5", 3),
            Some(Reply::Ok(Some(1_700_000_000.5)))
        );
        assert_eq!(
            parse_reply("ok 2 1700000000.5", 3),
            None,
            "a late answer to attempt 2"
        );
        assert_eq!(
            parse_reply("ok", 3),
            Some(Reply::Ok(None)),
            "an older guest"
        );
        assert_eq!(
            parse_reply("error 3 clock_settime: EPERM", 3),
            Some(Reply::Error("clock_settime: EPERM".into()))
        );
        assert_eq!(parse_reply("error 1 x", 3), None);
        assert_eq!(
            parse_reply("error bad seed", 3),
            Some(Reply::Error("bad seed".into()))
        );
        assert_eq!(parse_reply("", 3), None);
        assert_eq!(
            parse_any_reply("ok 4 1.5"),
            Some((Some(4), Reply::Ok(Some(1.5))))
        );
        assert_eq!(
            parse_any_reply("error unknown command \"exec\""),
            Some((None, Reply::Error("unknown command \"exec\"".into())))
        );
        assert_eq!(parse_any_reply("out 1 aGk="), None);
    }
}
