#!/usr/bin/env bash
# Runs the snapshot benchmark: starts Garage and a daemon of its own (ports
# 17070/18080, a temporary data dir), then `hatch-bench`, which prints min /
# median / max of Hatch's operations next to a plain QEMU migrate-to-file
# baseline measured in the same run (`snapshot`, the default), or wake latency
# after idle suspends and proxy throughput (`wake`), or, with a PostgreSQL of
# its own and a second daemon (ports 27070/28080), a two-node cluster:
# wakes with the local copy vs on the other node from S3, and forwarded vs
# local request latency (`cluster`), or a container image's import time, boot
# and wakes next to the default image's (`image`), or eight suspended 256 MiB
# VMs woken at once next to a single wake, each guest's clock checked (`herd`).
# Usage: scripts/bench.sh [snapshot|wake|cluster|image|herd] [--runs N] ...
set -euo pipefail
source "$(dirname "$0")/lib.sh"
SCENARIO=snapshot
case "${1:-}" in
  snapshot|wake|cluster|image|herd) SCENARIO=$1; shift ;;
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
DAEMONS=()
EXTRA=()
if [ "$SCENARIO" = cluster ]; then
  install_postgres
  # PostgreSQL refuses root: its own user, a temporary cluster, port 15432.
  PGDIR=$(mktemp -d /tmp/hatch-bench-pg-XXXXXX)
  if [ "$(id -u)" = 0 ]; then chown postgres "$PGDIR"; fi
  as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
  as_pg "$PG_BIN/initdb" -D "$PGDIR/data" -A trust -U postgres --no-sync >/dev/null
  as_pg "$PG_BIN/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/log" -w \
    -o "-p 15432 -k $PGDIR -c listen_addresses=127.0.0.1" start >/dev/null
  export HATCH_DATABASE_URL="postgres://postgres@127.0.0.1:15432/postgres"
  export HATCH_CLUSTER_SECRET="bench-cluster-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  export HATCH_SNAPSHOT_SECRET="bench-snapshot-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  mkdir -p "$DATA/n2"
  "$HATCH" serve --data-dir "$DATA/n2" --run-dir "$RUN-n2" --images-dir "$IMAGES" \
    --api-addr 127.0.0.1:27070 --proxy-addr 127.0.0.1:28080 \
    --node-name n2 --cluster-addr 127.0.0.1:27171 >"$DATA/hatch-n2.log" 2>&1 &
  DAEMONS+=($!)
  EXTRA=(--node-name n1 --cluster-addr 127.0.0.1:17171)
fi
"$HATCH" serve --data-dir "$DATA" --run-dir "$RUN" --images-dir "$IMAGES" \
  --api-addr 127.0.0.1:17070 --proxy-addr 127.0.0.1:18080 "${EXTRA[@]}" >"$DATA/hatch.log" 2>&1 &
DAEMONS+=($!)
cleanup() {
  kill "${DAEMONS[@]}" 2>/dev/null || true
  cp "$DATA/hatch.log" /tmp/hatch-bench-daemon.log 2>/dev/null || true
  for p in "$RUN"/*.pid "$RUN-n2"/*.pid; do
    [ -f "$p" ] && kill -9 "$(cat "$p")" 2>/dev/null || true
  done
  # The daemons' nftables tables (VM egress rules) go with them.
  for t in $(grep -ho 'table=hatch_[0-9a-f]*' "$DATA/hatch.log" "$DATA/hatch-n2.log" 2>/dev/null | sort -u); do
    nft delete table inet "${t#table=}" 2>/dev/null || true
  done
  if [ -n "${PGDIR:-}" ]; then
    as_pg "$PG_BIN/pg_ctl" -D "$PGDIR/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$PGDIR"
  fi
  # Lazy RAM mounts whose server was killed with the rest stay until detached.
  for m in $(awk '{print $5}' /proc/self/mountinfo | grep "^$RUN" || true); do
    umount -l "$m" 2>/dev/null || true
  done
  rm -rf "$DATA" "$RUN" "$RUN-n2"
}
trap cleanup EXIT
for port in 17070 $([ "$SCENARIO" = cluster ] && echo 27070); do
  for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
done

"$REPO/target/release/hatch-bench" "$SCENARIO" --data-dir "$DATA" --images-dir "$IMAGES" \
  --memory-mib 1024 --touch-mib "$TOUCH_MIB" "$@"
