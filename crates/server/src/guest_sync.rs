//! After a restore the guest's wall clock is where it stood at the capture
//! and its RNG state is shared with every other restore of the snapshot.
//! The guest agent fixes both; a restore is not done until it has
//! confirmed, with its clock checked. Under load (many wakes at once on
//! two cores) the agent can take seconds to answer, so the sync is retried
//! with growing per-attempt timeouts until `agent_sync_timeout`; if it
//! never succeeds the restore fails visibly rather than serve a guest with
//! a stale clock.

use std::time::{Duration, Instant};

use anyhow::Context;
use hatch_vmm::agent::Agent;

use crate::manager::VmManager;
use crate::supervisor::VmSupervisor;

/// Largest accepted difference between the host's clock and the guest's
/// right after a sync (the brief's bound is 1 s).
const MAX_OFFSET_SECS: f64 = 0.5;
const FIRST_ATTEMPT: Duration = Duration::from_secs(1);
const LONGEST_ATTEMPT: Duration = Duration::from_secs(8);

impl VmManager {
    /// Set the guest's clock and reseed its RNG, retrying until it is
    /// confirmed or `agent_sync_timeout` has passed, and address its
    /// outbound card unless the guest, restored from snapshot `from`,
    /// already holds the new run's address. Images without the agent are
    /// left as they are.
    pub(crate) async fn sync_guest_clock(
        &self,
        rt: &VmSupervisor,
        from: Option<&str>,
    ) -> anyhow::Result<()> {
        let vm = self.get(&rt.id).await?;
        let has_agent = self.images.get(&vm.image).map(|i| i.agent).unwrap_or(false);
        if !has_agent {
            tracing::debug!(vm = %rt.id, image = %vm.image, "image has no guest agent; clock not synced");
            return Ok(());
        }
        let socket = self.paths(&rt.id).agent_socket;
        let limit = self.cfg.agent_sync_timeout;
        let deadline = Instant::now() + limit;
        let mut agent: Option<Agent> = rt.lock().agent.clone().filter(|a| !a.is_closed());
        let mut attempts = 0u32;
        let mut last = String::from("no attempt");
        while Instant::now() < deadline {
            attempts += 1;
            if attempts > 1 {
                self.metrics.clock_sync_retries.inc();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = (FIRST_ATTEMPT * (1 << (attempts - 1).min(3)))
                .min(LONGEST_ATTEMPT)
                .min(left);
            let conn = match agent.as_mut() {
                Some(a) => a,
                None => match Agent::connect(&socket).await {
                    Ok(a) => agent.insert(a),
                    Err(e) => {
                        last = e.to_string();
                        tokio::time::sleep(Duration::from_millis(50).min(left)).await;
                        continue;
                    }
                },
            };
            if let Err(e) = self.faults.hit("agent.sync", &rt.id) {
                // As if the answer were lost: the attempt times out.
                last = e.to_string();
                tokio::time::sleep(wait).await;
                continue;
            }
            // The outbound card's address is asked for in the same breath
            // (the agent answers both in turn): one round trip, not two.
            // A wake onto the address the snapshot was taken with (the
            // usual case: the /30 is kept while free) skips it: the guest's
            // look at its card costs ~20 ms under emulation.
            let wanted = self.network.link_of(&rt.id).map(|l| l.addressing());
            let held = wanted.filter(|w| from.is_some_and(|s| rt.captured_with_net(s, *w)));
            let readdress = wanted.filter(|_| held.is_none());
            let (guest_addr, gateway) = match &readdress {
                Some(w) => (w.guest.to_string(), w.gateway.to_string()),
                None => Default::default(),
            };
            let started = Instant::now();
            let network = async {
                match readdress {
                    Some(_) => {
                        let r = conn.set_network(&guest_addr, &gateway, wait).await;
                        Some((r, started.elapsed()))
                    }
                    None => None,
                }
            };
            let clock = async {
                let r = conn.sync_clock_and_rng(wait).await;
                (r, started.elapsed())
            };
            let ((synced, clock_took), network) = tokio::join!(clock, network);
            tracing::debug!(vm = %rt.id, attempts, clock_ms = clock_took.as_secs_f64() * 1e3,
                network_ms = network.as_ref().map(|(_, t)| t.as_secs_f64() * 1e3),
                "guest agent answers");
            let network = network.map(|(r, _)| r);
            match synced {
                Ok(s) if s.offset.is_none_or(|o| o.abs() <= MAX_OFFSET_SECS) => {
                    if attempts > 1 {
                        rt.warn(format!(
                            "the guest agent confirmed the clock and RNG sync only after {attempts} attempts"
                        ));
                    }
                    let network = match network {
                        // Slower than the sync: given its own time.
                        Some(Err(_)) => Some(
                            conn.set_network(&guest_addr, &gateway, Duration::from_secs(5))
                                .await,
                        ),
                        other => other,
                    };
                    if readdress.is_some() {
                        self.metrics.guest_readdressed.inc();
                    }
                    let guest_net = match network {
                        Some(Err(e)) => {
                            // The VM serves (inbound is the proxy's); only
                            // its outbound connections fail. Said in its event.
                            rt.warn(format!("the guest's outbound network was not set up: {e}"));
                            None
                        }
                        Some(Ok(())) => readdress,
                        None => held,
                    };
                    let mut inner = rt.lock();
                    inner.agent = agent;
                    inner.guest_net = guest_net;
                    return Ok(());
                }
                Ok(s) => {
                    last = format!(
                        "the guest clock was {:.3} s off right after the sync",
                        s.offset.unwrap_or_default()
                    );
                }
                Err(hatch_vmm::VmmError::Agent(e)) => last = e,
                Err(e) => {
                    // The channel broke: connect again.
                    last = e.to_string();
                    agent = None;
                }
            }
            tracing::debug!(vm = %rt.id, attempts, error = %last, "clock sync attempt failed");
        }
        self.metrics.clock_sync_failures.inc();
        Err(anyhow::anyhow!(
            "the guest agent did not confirm the clock and RNG sync within {} s ({attempts} attempts; last: {last})",
            limit.as_secs()
        ))
        .context("syncing the guest's clock")
    }
}
