//! Async client for the QEMU Machine Protocol (QMP).
