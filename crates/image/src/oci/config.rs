//! The part of an image's config a VM needs to run its app.

use serde::{Deserialize, Serialize};

/// How to run an image's app (from its OCI or Docker config).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppConfig {
    /// `Entrypoint`: the program and its first arguments.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// `Cmd`: arguments after the entrypoint (or the program, without one).
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `Env`: `KEY=VALUE` lines, in order.
    #[serde(default)]
    pub env: Vec<String>,
    /// `WorkingDir`; `/` when empty.
    #[serde(default)]
    pub working_dir: String,
    /// `User`: `name`, `uid`, `name:group` or `uid:gid`; root when empty.
    #[serde(default)]
    pub user: String,
    /// TCP ports of `ExposedPorts`, ascending.
    #[serde(default)]
    pub exposed_ports: Vec<u16>,
}

impl AppConfig {
    /// From an image config's `config` object (OCI and Docker write the
    /// same names).
    pub(crate) fn from_image_config(
        c: Option<&oci_spec::image::Config>,
    ) -> Result<AppConfig, String> {
        let Some(c) = c else {
            return Ok(AppConfig::default());
        };
        let mut exposed_ports = Vec::new();
        for spec in c.exposed_ports().iter().flatten() {
            let (port, proto) = spec.split_once('/').unwrap_or((spec.as_str(), "tcp"));
            if proto != "tcp" {
                continue; // UDP and SCTP are not proxied
            }
            let port: u16 = port
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("exposed port {spec:?} is not a port number"))?;
            exposed_ports.push(port);
        }
        exposed_ports.sort_unstable();
        exposed_ports.dedup();
        let env = c.env().clone().unwrap_or_default();
        if let Some(bad) = env.iter().find(|e| !e.contains('=')) {
            return Err(format!("environment entry {bad:?} is not KEY=VALUE"));
        }
        Ok(AppConfig {
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            env,
            working_dir: c.working_dir().clone().unwrap_or_default(),
            user: c.user().clone().unwrap_or_default(),
            exposed_ports,
        })
    }

    /// The command line the app runs: entrypoint then cmd.
    pub fn argv(&self) -> Vec<String> {
        self.entrypoint.iter().chain(&self.cmd).cloned().collect()
    }
}
