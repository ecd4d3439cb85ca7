#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian 12 machine: installs what the
# tests need (idempotent, cached), builds the guest image, checks format and
# lints, then runs unit and end-to-end tests (real QEMU VMs under TCG here).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO"

install_packages
log "building hatch"
cargo build --quiet --bin hatch
export HATCH_TEST_IMAGES_DIR="$HATCH_CACHE/images"
build_image "$HATCH_TEST_IMAGES_DIR" "$REPO/target/debug/hatch" >/dev/null

log "format and lints"
cargo fmt --all -- --check
cargo clippy --quiet --workspace --all-targets -- -D warnings

log "tests"
cargo test --workspace
