//! The QEMU driver: command line, spawn and re-adopt, lifecycle.
