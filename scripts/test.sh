#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian 12 machine: installs what the
# tests need (idempotent, cached), builds the guest image, checks format and
# lints, then runs unit and end-to-end tests (real QEMU VMs under TCG here).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO"

install_packages
install_garage   # real S3 for the snapshot tests
export HATCH_GARAGE="$GARAGE"
install_postgres   # the tests start their own PostgreSQL servers
export HATCH_PG_BIN="$PG_BIN"
install_openapi_validator   # checks the served OpenAPI document
export HATCH_OPENAPI_VALIDATOR="$OPENAPI_VALIDATOR"
log "building hatch"
cargo build --quiet --bin hatch
export HATCH_TEST_IMAGES_DIR="$HATCH_CACHE/images"
build_image "$HATCH_TEST_IMAGES_DIR" "$REPO/target/debug/hatch" >/dev/null

log "format and lints"
cargo fmt --all -- --check
cargo clippy --quiet --workspace --all-targets -- -D warnings

log "tests"
# nextest runs test binaries in parallel processes and ends with one summary
# line; plain cargo test is the fallback where nextest is missing.
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --all-targets --no-fail-fast
fi
