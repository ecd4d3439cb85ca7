//! The reverse proxy: routes HTTP by Host header to VMs.
