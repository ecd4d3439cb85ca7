#!/usr/bin/env bash
# Runs the snapshot benchmark: starts Garage and a daemon of its own (ports
# 17070/18080, a temporary data dir), then `hatch-bench`, which prints min /
# median / max of Hatch's operations next to a plain QEMU migrate-to-file
# baseline measured in the same run (`snapshot`, the default), or wake latency
# after idle suspends and proxy throughput (`wake`).
# Usage: scripts/bench.sh [snapshot|wake] [--runs N] ...
set -euo pipefail
source "$(dirname "$0")/lib.sh"
SCENARIO=snapshot
case "${1:-}" in
  snapshot|wake) SCENARIO=$1; shift ;;
esac
cd "$REPO"

install_packages
install_garage
log "building hatch and hatch-bench (release)"
cargo build --release --quiet --bin hatch --bin hatch-bench
HATCH="$REPO/target/release/hatch"
IMAGES="$HATCH_CACHE/images"
build_image "$IMAGES" "$HATCH" >/dev/null

# The benchmark image: the default image with a 400 MiB working set.
TOUCH_MIB="${TOUCH_MIB:-400}"
cmdline=$(sed -n 's/.*"cmdline": "\(.*\)".*/\1/p' "$IMAGES/default/image.json")
rm -rf "$IMAGES/bench-touch"
"$HATCH" image register bench-touch --images-dir "$IMAGES" \
  --kernel "$IMAGES/default/vmlinux" --initrd "$IMAGES/default/initrd.img" \
  --disk "$(ls "$IMAGES"/default/base-*.raw | head -1)" \
  --cmdline "$cmdline hatch.touch_mib=$TOUCH_MIB" --agent >/dev/null

eval "$(start_garage "${HATCH_DATA_DIR:-$HOME/.local/share/hatch}/garage")"
DATA=$(mktemp -d /tmp/hatch-bench-XXXXXX)
RUN="/dev/shm/$(basename "$DATA")"
export HATCH_API_KEY="hatch_bench_$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
"$HATCH" serve --data-dir "$DATA" --run-dir "$RUN" --images-dir "$IMAGES" \
  --api-addr 127.0.0.1:17070 --proxy-addr 127.0.0.1:18080 >"$DATA/hatch.log" 2>&1 &
DAEMON=$!
cleanup() {
  kill "$DAEMON" 2>/dev/null || true
  cp "$DATA/hatch.log" /tmp/hatch-bench-daemon.log 2>/dev/null || true
  for p in "$RUN"/*.pid; do
    [ -f "$p" ] && kill -9 "$(cat "$p")" 2>/dev/null || true
  done
  rm -rf "$DATA" "$RUN"
}
trap cleanup EXIT
for _ in $(seq 100); do curl -fsS http://127.0.0.1:17070/healthz >/dev/null 2>&1 && break; sleep 0.1; done

"$REPO/target/release/hatch-bench" "$SCENARIO" --data-dir "$DATA" --images-dir "$IMAGES" \
  --memory-mib 1024 --touch-mib "$TOUCH_MIB" "$@"
