//! The Hatch daemon: API, state, per-VM supervisors, composition root.
