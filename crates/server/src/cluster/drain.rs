//! `POST /nodes/{name}/drain` (`hatch node drain NODE`): mark the node
//! `draining`, then move each of its running or suspended VMs to the up node
//! with the fewest VMs (running ones are woken there, suspended ones stay
//! suspended there). Stopped and failed VMs stay: their disks are that
//! node's. `POST /nodes/{name}/undrain` marks it `up` again.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, StatusCode, header};
use serde::Serialize;
use serde_json::{Value, json};

use crate::cluster::placement;
use crate::error::ApiError;
use crate::manager::VmManager;
use crate::model::VmState;
use crate::resolver::API_HOST;

/// What a drain did with each VM of the node.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct DrainReport {
    pub node: String,
    /// `{vm, to}` for each VM moved.
    #[schema(value_type = Vec<Object>)]
    pub moved: Vec<Value>,
    /// `{vm, state, reason}` for each VM left on the node.
    #[schema(value_type = Vec<Object>)]
    pub left: Vec<Value>,
}

impl VmManager {
    pub async fn set_draining(&self, node: &str, draining: bool) -> Result<(), ApiError> {
        let state = if draining { "draining" } else { "up" };
        if !self.store.set_node_state(node, state).await? {
            return Err(ApiError::not_found("node", node));
        }
        self.peers.forget_all();
        tracing::info!(node, state, "node state set");
        Ok(())
    }

    /// Drain `node`, moving its VMs off with the caller's `authorization`.
    pub async fn drain_node(
        self: &Arc<Self>,
        node: &str,
        authorization: Option<HeaderValue>,
    ) -> Result<DrainReport, ApiError> {
        self.set_draining(node, true).await?;
        let mut report = DrainReport {
            node: node.to_string(),
            ..Default::default()
        };
        for rec in self.store.list_vms().await? {
            let vm = rec.vm;
            if vm.node.as_deref() != Some(node) {
                continue;
            }
            if !matches!(vm.state, VmState::Running | VmState::Snapshotted) {
                report.left.push(json!({
                    "vm": vm.id, "state": vm.state,
                    "reason": "only running and suspended vms move (a stopped or failed vm's disk stays on its node)",
                }));
                continue;
            }
            let nodes =
                crate::cluster::nodes::list(self.store.as_ref(), self.cfg.node_down_after).await?;
            let Some(to) = placement::least_loaded(&nodes, vm.memory_mib, None, Some(node))
                .map(str::to_string)
            else {
                report.left.push(json!({
                    "vm": vm.id, "state": vm.state,
                    "reason": "no other node is up with room for it",
                }));
                continue;
            };
            let body = json!({ "to": to, "start": vm.state == VmState::Running });
            let outcome = if node == self.cfg.node_name {
                self.move_vm(&vm.id, &to)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            } else {
                self.ask_node(
                    node,
                    &format!("/vms/{}/move", vm.id),
                    &body,
                    authorization.clone(),
                )
                .await
            };
            match outcome {
                Ok(()) => report.moved.push(json!({ "vm": vm.id, "to": to })),
                Err(reason) => report.left.push(json!({
                    "vm": vm.id, "state": vm.state, "reason": reason,
                })),
            }
        }
        Ok(report)
    }

    /// `POST path` with a JSON body to node `node`'s API (a signed hop);
    /// Err: why it did not succeed.
    async fn ask_node(
        &self,
        node: &str,
        path: &str,
        body: &Value,
        authorization: Option<HeaderValue>,
    ) -> Result<(), String> {
        let key = self
            .hop
            .as_ref()
            .ok_or("this node has no HATCH_CLUSTER_SECRET")?;
        let addr = crate::cluster::nodes::list(self.store.as_ref(), self.cfg.node_down_after)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|n| n.name == node)
            .and_then(|n| n.address)
            .ok_or_else(|| format!("node '{node}' has no cluster address"))?;
        let (hop_name, hop_value) = key.sign(API_HOST);
        let mut req = crate::cluster::peers::client()
            .request(Method::POST, format!("http://{addr}{path}"))
            .header(header::HOST, API_HOST)
            .header(hop_name, hop_value)
            .timeout(Duration::from_secs(900))
            .json(body);
        if let Some(auth) = authorization {
            req = req.header(header::AUTHORIZATION, auth);
        }
        let answer = req
            .send()
            .await
            .map_err(|e| format!("node '{node}': {e}"))?;
        let status = answer.status();
        if status == StatusCode::ACCEPTED || status.is_success() {
            return Ok(());
        }
        let text = answer.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(text);
        Err(format!("node '{node}' answered {status}: {message}"))
    }
}
