//! Routes made through other nodes: with a shared database every node
//! re-reads the route table every [`REFRESH_EVERY`], and at once (at most
//! every [`REFRESH_ON_MISS`]) when a request names a host it does not know.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::manager::VmManager;

pub const REFRESH_EVERY: Duration = Duration::from_secs(1);
const REFRESH_ON_MISS: Duration = Duration::from_millis(200);

impl VmManager {
    /// Whether other daemons write the same database (routes and VMs may
    /// change under this one).
    pub fn shares_state(&self) -> bool {
        self.store.backend() == "postgres"
    }

    /// Read the routes again; true if it was done (not too soon after the
    /// last time, `min_gap`).
    pub(crate) async fn refresh_routes(&self, min_gap: Duration) -> bool {
        {
            let mut last = self
                .routes_read_at
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|at| at.elapsed() < min_gap) {
                return false;
            }
            *last = Some(Instant::now());
        }
        match self.store.list_routes().await {
            Ok(routes) => {
                self.routes.replace_all(routes);
                true
            }
            Err(e) => {
                tracing::debug!(error = %anyhow::Error::from(e), "re-reading routes failed");
                false
            }
        }
    }

    /// A host this node has no route for: re-read the routes (another node
    /// may have made it) if that was not just done.
    pub(crate) async fn refresh_routes_on_miss(&self) -> bool {
        self.shares_state() && self.refresh_routes(REFRESH_ON_MISS).await
    }

    /// Keep the route table in step with the shared database until `shutdown`.
    pub async fn route_refresher(self: Arc<Self>, shutdown: CancellationToken) {
        if !self.shares_state() {
            return;
        }
        let mut tick = tokio::time::interval(REFRESH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.refresh_routes(REFRESH_EVERY / 2).await;
        }
    }
}
