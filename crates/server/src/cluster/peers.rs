//! Where another node's VM runs: the VM's `node` and that node's cluster
//! address and liveness, read from the state store and cached briefly, so
//! that forwarding a request costs no database round trip on the hot path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::state::{StateStore, StoreError};

/// The HTTP client for calls to other nodes (shared: it pools connections).
pub fn client() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default()
    })
}

/// How long an owner lookup is reused. Ownership changes (a move, a
/// takeover) are seen by other nodes' proxies within this time; until then
/// the old owner answers (it serves only VMs it still runs).
const TTL: Duration = Duration::from_secs(1);

/// A VM that another node owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteVm {
    pub node: String,
    /// Its `--cluster-addr`; None if it has none (it cannot be forwarded to).
    pub addr: Option<SocketAddr>,
    /// Heard from within the down time.
    pub up: bool,
}

pub struct Peers {
    store: Arc<dyn StateStore>,
    me: String,
    down_after: Duration,
    cache: Mutex<HashMap<String, (Instant, Option<RemoteVm>)>>,
}

impl Peers {
    pub fn new(store: Arc<dyn StateStore>, me: &str, down_after: Duration) -> Peers {
        Peers {
            store,
            me: me.to_string(),
            down_after,
            cache: Mutex::default(),
        }
    }

    /// The node that owns `vm_id` if it is another one; None for this
    /// node's VMs and unknown ones.
    pub async fn remote(&self, vm_id: &str) -> Result<Option<RemoteVm>, StoreError> {
        if let Some((at, found)) = self.lock().get(vm_id)
            && at.elapsed() < TTL
        {
            return Ok(found.clone());
        }
        let found = self.look_up(vm_id).await?;
        let mut cache = self.lock();
        // Bounded: entries of deleted or moved VMs go when they expire.
        cache.retain(|_, (at, _)| at.elapsed() < TTL);
        cache.insert(vm_id.to_string(), (Instant::now(), found.clone()));
        Ok(found)
    }

    async fn look_up(&self, vm_id: &str) -> Result<Option<RemoteVm>, StoreError> {
        let Some(node) = self.store.get_vm(vm_id).await?.and_then(|r| r.vm.node) else {
            return Ok(None);
        };
        if node == self.me {
            return Ok(None);
        }
        let record = self
            .store
            .list_nodes()
            .await?
            .into_iter()
            .find(|n| n.name == node);
        Ok(Some(RemoteVm {
            addr: record
                .as_ref()
                .and_then(|n| n.addr.as_deref())
                .and_then(|a| a.parse().ok()),
            up: record.is_some_and(|n| n.silent_for <= self.down_after && n.state != "down"),
            node,
        }))
    }

    /// Drop everything known (a node's state changed).
    pub fn forget_all(&self) {
        self.lock().clear();
    }

    /// Drop what is known about `vm_id` (its owner changed).
    pub fn forget(&self, vm_id: &str) {
        self.lock().remove(vm_id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Option<RemoteVm>)>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}
