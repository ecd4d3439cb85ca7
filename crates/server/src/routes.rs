//! Proxy routes: stored in the state store, served from an in-memory table so that a
//! proxied request never touches the database.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use hatch_vmm::PortForward;

use crate::error::ApiError;
use crate::manager::{VmManager, new_id, now_rfc3339};
use crate::model::{self, CreateRoute, Route, VmState};
use crate::state::{StateStore, StoreError};

/// Longest idle timeout accepted: 30 days.
const MAX_IDLE_TIMEOUT_SECONDS: u64 = 30 * 24 * 3600;
/// Most path prefixes a route may exclude from idle detection.
const MAX_IGNORED_PATHS: usize = 16;

#[derive(Default)]
pub struct RouteTable {
    by_host: RwLock<HashMap<String, Route>>,
}

impl RouteTable {
    pub async fn load(store: &dyn StateStore) -> Result<RouteTable, StoreError> {
        let table = RouteTable::default();
        for r in store.list_routes().await? {
            table.insert(r);
        }
        Ok(table)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Route>> {
        self.by_host.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Route>> {
        self.by_host.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Replace every route with `routes` (read again from a store that other
    /// nodes write too).
    pub fn replace_all(&self, routes: Vec<Route>) {
        *self.write() = routes
            .into_iter()
            .map(|r| (r.hostname.clone(), r))
            .collect();
    }

    pub fn insert(&self, route: Route) {
        self.write().insert(route.hostname.clone(), route);
    }

    pub fn remove(&self, hostname: &str) {
        self.write().remove(hostname);
    }

    pub fn get(&self, hostname: &str) -> Option<Route> {
        self.read().get(hostname).cloned()
    }

    /// The idle timeout of a VM: the longest of its routes' (a VM is idle
    /// only when every route is); None when no route sets one.
    pub fn idle_timeout_of(&self, vm_id: &str) -> Option<std::time::Duration> {
        self.idle_setting_of(vm_id)
            .map(|(secs, _)| std::time::Duration::from_secs(secs))
    }

    /// The idle timeout that applies to a VM and the host name of the route
    /// that sets it (the longest; ties go to the first host name).
    pub fn idle_setting_of(&self, vm_id: &str) -> Option<(u64, String)> {
        self.read()
            .values()
            .filter(|r| r.vm_id == vm_id)
            .filter_map(|r| Some((r.idle_timeout_seconds?, r.hostname.clone())))
            .min_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)))
    }

    /// Guest ports that routes to `vm_id` need forwarded.
    pub fn ports_of(&self, vm_id: &str) -> BTreeSet<u16> {
        self.read()
            .values()
            .filter(|r| r.vm_id == vm_id)
            .map(|r| r.port)
            .collect()
    }
}

impl VmManager {
    /// The guest port a route gets when it names none: the first port the
    /// VM's image exposes (an imported container image), else 8080.
    async fn default_guest_port(&self, vm_id: &str) -> Result<u16, ApiError> {
        let ports = match self.store.get_vm(vm_id).await? {
            Some(rec) => self.exposed_ports(&rec.vm.image).await,
            None => Vec::new(),
        };
        Ok(ports.first().copied().unwrap_or(model::DEFAULT_GUEST_PORT))
    }

    pub async fn create_route(self: &Arc<Self>, req: CreateRoute) -> Result<Route, ApiError> {
        let hostname = model::normalize_hostname(&req.hostname)?;
        if req.port == Some(0) {
            return Err(ApiError::invalid("port must be between 1 and 65535"));
        }
        if let Some(t) = req.idle_timeout_seconds
            && !(1..=MAX_IDLE_TIMEOUT_SECONDS).contains(&t)
        {
            return Err(ApiError::invalid(format!(
                "idle_timeout_seconds must be between 1 and {MAX_IDLE_TIMEOUT_SECONDS}, got {t}"
            )));
        }
        let idle_ignore_paths = req.idle_ignore_paths.clone().unwrap_or_default();
        if idle_ignore_paths.len() > MAX_IGNORED_PATHS
            || idle_ignore_paths
                .iter()
                .any(|p| !p.starts_with('/') || p.len() > 256)
        {
            return Err(ApiError::invalid(format!(
                "idle_ignore_paths must be at most {MAX_IGNORED_PATHS} path prefixes, each starting with '/' and at most 256 bytes"
            )));
        }
        let vm_id = self.resolve_local(&req.vm_id).await?;
        let rt = self.supervisor(&vm_id)?;
        let port = match req.port {
            Some(port) => port,
            None => self.default_guest_port(&vm_id).await?,
        };
        // Under the VM's operation lock: a boot picks its forwards from the
        // route table, and a delete removes the VM's routes; neither may
        // interleave with this. The forward is added before anything is
        // recorded, so a failure leaves no route behind.
        let _guard = rt.begin("route update").await;
        self.supervisor(&rt.id)?; // deleted while we waited?
        if self.routes.get(&hostname).is_some() {
            return Err(ApiError::conflict(format!(
                "a route for host '{hostname}' already exists"
            )));
        }
        self.ensure_forward(&rt, port).await?;
        let route = Route {
            id: new_id("rt"),
            hostname,
            vm_id,
            port,
            auto_wake: req.auto_wake.unwrap_or(true),
            idle_timeout_seconds: req.idle_timeout_seconds,
            idle_ignore_paths,
            created_at: now_rfc3339(),
            vm_state: None,
        };
        if let Err(e) = self.store.insert_route(&route).await {
            if self
                .store
                .list_routes()
                .await?
                .iter()
                .any(|r| r.hostname == route.hostname)
            {
                return Err(ApiError::conflict(format!(
                    "a route for host '{}' already exists",
                    route.hostname
                )));
            }
            return Err(e.into());
        }
        if route.idle_timeout_seconds.is_some() {
            // The idle clock starts no earlier than the route that sets it.
            rt.activity.touch();
        }
        self.routes.insert(route.clone());
        tracing::info!(route = %route.id, host = %route.hostname, vm = %route.vm_id, port, "route created");
        Ok(self.with_vm_state(route))
    }

    /// Forward `guest_port` of a running VM if it is not forwarded yet.
    async fn ensure_forward(
        &self,
        rt: &crate::supervisor::VmSupervisor,
        guest_port: u16,
    ) -> Result<(), ApiError> {
        let (state, machine, forwards) = {
            let inner = rt.lock();
            (inner.state, inner.machine.clone(), inner.forwards.clone())
        };
        if state != VmState::Running || forwards.iter().any(|f| f.guest == guest_port) {
            return Ok(());
        }
        let Some(machine) = machine else {
            return Ok(());
        };
        let forward = PortForward {
            host: hatch_vmm::host::free_port().map_err(anyhow::Error::from)?,
            guest: guest_port,
        };
        machine.add_forward(forward).await.map_err(|e| {
            ApiError::Internal(anyhow::Error::new(e).context("adding port forward"))
        })?;
        let forwards = {
            let mut inner = rt.lock();
            inner.forwards.push(forward);
            inner.last_ports.retain(|f| f.guest != guest_port);
            inner.last_ports.push(forward);
            inner.forwards.clone()
        };
        self.store
            .set_vm_forwards(&rt.id, &forwards, &self.cfg.node_name)
            .await?;
        Ok(())
    }

    fn with_vm_state(&self, mut route: Route) -> Route {
        route.vm_state = self.supervisor(&route.vm_id).ok().map(|rt| rt.state());
        route
    }

    pub async fn list_routes(&self) -> Result<Vec<Route>, ApiError> {
        Ok(self
            .store
            .list_routes()
            .await?
            .into_iter()
            .map(|r| self.with_vm_state(r))
            .collect())
    }

    /// A route by id or host name.
    pub async fn get_route(&self, id_or_host: &str) -> Result<Route, ApiError> {
        let host = id_or_host.to_ascii_lowercase();
        self.list_routes()
            .await?
            .into_iter()
            .find(|r| r.id == id_or_host || r.hostname == host)
            .ok_or_else(|| ApiError::not_found("route", id_or_host))
    }

    pub async fn delete_route(&self, id_or_host: &str) -> Result<(), ApiError> {
        let route = self.get_route(id_or_host).await?;
        if !self.store.delete_route(&route.id).await? {
            return Err(ApiError::not_found("route", id_or_host));
        }
        self.routes.remove(&route.hostname);
        tracing::info!(route = %route.id, host = %route.hostname, "route deleted");
        Ok(())
    }
}
