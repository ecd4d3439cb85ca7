//! End-to-end test harness: real daemon, real QEMU, real proxy.
