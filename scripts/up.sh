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

# Every setting in the data dir's config file, which `hatch serve
# --data-dir $DATA` reads by default: a restart needs no environment.
# Readable by this user only (S3 secret, API key).
(umask 077; cat >"$DATA/config.toml.new" <<TOML
# Written by scripts/up.sh; read by \`hatch serve --data-dir $DATA\`.
api_addr = "$API_ADDR"
proxy_addr = "$PROXY_ADDR"
api_key = "$HATCH_API_KEY"

[s3]
endpoint = "$HATCH_S3_ENDPOINT"
bucket = "$HATCH_S3_BUCKET"
region = "$HATCH_S3_REGION"
access_key_id = "$HATCH_S3_ACCESS_KEY_ID"
secret_access_key = "$HATCH_S3_SECRET_ACCESS_KEY"
TOML
)
mv "$DATA/config.toml.new" "$DATA/config.toml"

if curl -fsS "http://$API_ADDR/healthz" >/dev/null 2>&1; then
  log "hatch serve already runs on $API_ADDR"
else
  log "starting hatch serve (log: $DATA/hatch.log)"
  # Only the data dir: everything else comes from its config.toml, as on
  # any restart.
  nohup env -u HATCH_API_KEY -u HATCH_S3_ENDPOINT -u HATCH_S3_BUCKET -u HATCH_S3_REGION \
    -u HATCH_S3_ACCESS_KEY_ID -u HATCH_S3_SECRET_ACCESS_KEY \
    "$HATCH" serve --data-dir "$DATA" >>"$DATA/hatch.log" 2>&1 &
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

Settings (S3, API key, addresses) are in $DATA/config.toml: restart with
  $HATCH serve --data-dir $DATA
The CLI finds the key in $DATA/api-key.

Try:
  curl -H 'Host: demo.localhost' http://$PROXY_ADDR/
  curl -H 'Host: demo.localhost' http://$PROXY_ADDR/counter
  $HATCH vm list
MSG
curl -sS -H 'Host: demo.localhost' "http://$PROXY_ADDR/"
