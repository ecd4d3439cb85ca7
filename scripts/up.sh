#!/usr/bin/env bash
# Runs Hatch with everything local on a fresh Debian 12 machine: installs what
# is missing, builds hatch, the guest image and Garage (all cached), starts
# Garage and `hatch serve`, and a demo VM routed at demo.localhost.
# Idempotent: a second run reuses what runs already.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO"

DATA="${HATCH_DATA_DIR:-$HOME/.local/share/hatch}"
API_ADDR="${HATCH_API_ADDR:-127.0.0.1:7070}"
PROXY_ADDR="${HATCH_PROXY_ADDR:-127.0.0.1:8080}"
mkdir -p "$DATA"

install_packages
install_garage
log "building hatch (release)"
cargo build --release --quiet --bin hatch
HATCH="$REPO/target/release/hatch"
# Into the shared cache, where every `hatch serve` looks after its own
# images dir (HATCH_IMAGE_CACHE_DIR): a new data dir needs no image step.
build_image "$HATCH_CACHE/images" "$HATCH" >/dev/null

eval "$(start_garage "$DATA/garage")"

# One API key, kept in the data dir (readable by this user only).
if [ ! -s "$DATA/api-key" ]; then
  (umask 077; echo "hatch_$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$DATA/api-key")
fi
export HATCH_API_KEY; HATCH_API_KEY=$(cat "$DATA/api-key")
export HATCH_API="http://$API_ADDR"

if curl -fsS "http://$API_ADDR/healthz" >/dev/null 2>&1; then
  log "hatch serve already runs on $API_ADDR"
else
  log "starting hatch serve (log: $DATA/hatch.log)"
  nohup "$HATCH" serve --data-dir "$DATA" --api-addr "$API_ADDR" --proxy-addr "$PROXY_ADDR" \
    >>"$DATA/hatch.log" 2>&1 &
  echo $! >"$DATA/hatch.pid"
  for _ in $(seq 200); do curl -fsS "http://$API_ADDR/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
  curl -fsS "http://$API_ADDR/healthz" >/dev/null || { tail -20 "$DATA/hatch.log"; exit 1; }
fi

state=$("$HATCH" vm get demo --json 2>/dev/null | sed -n 's/.*"state": "\(.*\)".*/\1/p' || true)
case "$state" in
  "") log "creating the demo VM"; "$HATCH" vm create --name demo --wait >/dev/null ;;
  stopped|failed) log "starting the demo VM"; "$HATCH" vm start demo --wait >/dev/null ;;
  *) log "demo VM is $state" ;;
esac
if ! "$HATCH" route list --json | grep -q '"demo.localhost"'; then
  "$HATCH" route create --host demo.localhost --vm demo --idle-timeout 5m >/dev/null
fi
log "waiting for the demo app to answer through the proxy"
for _ in $(seq 600); do
  curl -fsS -H 'Host: demo.localhost' "http://$PROXY_ADDR/" >/dev/null 2>&1 && break
  sleep 0.2
done

cat <<MSG

Hatch is running.
  API:   http://$API_ADDR    (key in $DATA/api-key)
  Proxy: http://$PROXY_ADDR
  S3:    Garage at http://127.0.0.1:3900, bucket hatch

The demo VM is suspended to S3 after 5 minutes without requests; the next
request wakes it (same boot id, the counter goes on).

Try:
  curl -H 'Host: demo.localhost' http://$PROXY_ADDR/
  curl -H 'Host: demo.localhost' http://$PROXY_ADDR/counter
  export HATCH_API=http://$API_ADDR HATCH_API_KEY=\$(cat $DATA/api-key)
  $HATCH vm list
MSG
curl -sS -H 'Host: demo.localhost' "http://$PROXY_ADDR/"
