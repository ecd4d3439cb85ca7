# Shared by the set-up scripts: idempotent installs, cached under ~/.cache/hatch.
# shellcheck shell=bash

HATCH_CACHE="${HATCH_CACHE_DIR:-$HOME/.cache/hatch}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GUEST_TARGET=x86_64-unknown-linux-gnu

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Debian packages the VMs need: QEMU and qemu-img (one release: bookworm's
# 7.2, the version Hatch is tested with), busybox for the initramfs,
# mkfs.ext4 for the base disk, dpkg-deb to unpack the kernel package.
# Machine images may ship other versions (e.g. qemu-utils 10.0 from
# backports, which installing bookworm's qemu-system-x86 removes), so what is
# installed is checked afterwards, not assumed.
QEMU_SUITE=bookworm

qemu_version_of() { "$1" --version 2>/dev/null | sed -n 's/.*version \([0-9][0-9.]*\).*/\1/p' | head -1; }

# Both QEMU programs run and come from the same QEMU release.
qemu_consistent() {
  local sys img
  sys=$(qemu_version_of qemu-system-x86_64) img=$(qemu_version_of qemu-img)
  [ -n "$sys" ] && [ "$sys" = "$img" ]
}

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  if [ -z "${HATCH_APT_UPDATED:-}" ]; then
    apt-get update -qq
    HATCH_APT_UPDATED=1
  fi
  apt-get install -y -qq --no-install-recommends --allow-downgrades "$@" >/dev/null
}

install_packages() {
  # nftables and iproute2: VMs' outbound network (tap devices, firewall).
  local pkgs=(busybox-static e2fsprogs curl ca-certificates nftables iproute2)
  local missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt_install "${missing[@]}"
  fi
  if ! qemu_consistent; then
    log "installing QEMU from $QEMU_SUITE (qemu-system-x86_64 $(qemu_version_of qemu-system-x86_64 || true), qemu-img $(qemu_version_of qemu-img || true) found)"
    apt_install "qemu-system-x86/$QEMU_SUITE" "qemu-utils/$QEMU_SUITE"
  fi
  check_programs
}

# PostgreSQL's server programs (the cluster's state store; the tests run
# their own server): the newest /usr/lib/postgresql/<version>/bin.
pg_bin_dir() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -n "$d" ] && echo "$d"
}

# PostgreSQL (Debian's package) for a cluster's state and for the tests,
# which run their own servers as the postgres user. Sets PG_BIN.
install_postgres() {
  if [ -z "$(pg_bin_dir || true)" ]; then
    log "installing PostgreSQL"
    apt_install postgresql
  fi
  PG_BIN=$(pg_bin_dir || true)
  if [ -z "$PG_BIN" ] || ! "$PG_BIN/initdb" --version >/dev/null 2>&1 \
      || ! "$PG_BIN/pg_ctl" --version >/dev/null 2>&1; then
    echo "error: PostgreSQL's initdb and pg_ctl do not run (package postgresql)" >&2
    exit 1
  fi
  if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    echo "error: no postgres user (PostgreSQL's server refuses to run as root)" >&2
    exit 1
  fi
  log "PostgreSQL $("$PG_BIN/pg_ctl" --version | awk '{print $3}'): ok"
}

# Fail loudly unless every program Hatch runs is there and works.
check_programs() {
  local failed=0
  local checks=(
    "qemu-system-x86_64 --version"
    "qemu-img --version"
    "busybox --help"
    "mkfs.ext4 -V"
    "dpkg-deb --version"
    "curl --version"
    "nft --version"
    "ip -V"
  )
  for c in "${checks[@]}"; do
    if ! $c >/dev/null 2>&1; then
      echo "error: \`$c\` does not run" >&2
      failed=1
    fi
  done
  if ! qemu_consistent; then
    echo "error: qemu-system-x86_64 ($(qemu_version_of qemu-system-x86_64)) and qemu-img ($(qemu_version_of qemu-img)) are from different QEMU releases" >&2
    failed=1
  fi
  [ "$failed" = 0 ] || { echo "error: set-up incomplete; see above" >&2; exit 1; }
  log "QEMU $(qemu_version_of qemu-system-x86_64), busybox, e2fsprogs, nft, ip: ok"
}

# The statically linked program that runs inside the guest (demo app, agent).
build_guest() {
  log "building the guest binary (static)"
  (cd "$REPO" && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --quiet -p hatch-guest --target "$GUEST_TARGET")
  echo "$REPO/target/$GUEST_TARGET/release/hatch-guest"
}

# Build the default image into $1 with the hatch binary $2.
build_image() {
  local images_dir=$1 hatch=$2 guest
  guest=$(build_guest)
  log "building the default guest image into $images_dir"
  "$hatch" image build --images-dir "$images_dir" --cache-dir "$HATCH_CACHE" --guest-bin "$guest"
}

GARAGE_ROOT="$HATCH_CACHE/garage-install"
GARAGE="$GARAGE_ROOT/bin/garage"

# Garage, the S3 server used locally and in tests (built once, ~15 min on 2 cores).
# openapi-spec-validator (PyPI) in a venv in the cache: the API test checks
# the served OpenAPI document with it. Sets OPENAPI_VALIDATOR.
install_openapi_validator() {
  local venv="$HATCH_CACHE/openapi-venv"
  OPENAPI_VALIDATOR="$venv/bin/openapi-spec-validator"
  if ! "$OPENAPI_VALIDATOR" --help >/dev/null 2>&1; then
    log "installing openapi-spec-validator into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$venv"; }
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'openapi-spec-validator==0.7.1'
  fi
  "$OPENAPI_VALIDATOR" --help >/dev/null 2>&1 || { echo "error: $OPENAPI_VALIDATOR does not run" >&2; exit 1; }
}

install_garage() {
  if [ ! -x "$GARAGE" ]; then
    log "building Garage (once; cached in $GARAGE_ROOT)"
    cargo install garage --locked --quiet --root "$GARAGE_ROOT"
  fi
}

# Start a single-node Garage with its state in $1 unless it already runs, and
# make sure bucket "hatch" and key "hatch" exist. Prints shell exports of the
# HATCH_S3_* settings.
start_garage() {
  local dir=$1 cfg="$1/garage.toml"
  mkdir -p "$dir/meta" "$dir/data"
  if [ ! -f "$cfg" ]; then
    cat >"$cfg" <<TOML
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
# Hatch's chunks are zstd-compressed objects of ~1 MiB: store them as they
# are, in one block each.
block_size = "4M"
compression_level = "none"
rpc_bind_addr = "127.0.0.1:3901"
rpc_public_addr = "127.0.0.1:3901"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:3900"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:3903"
TOML
  fi
  local g=("$GARAGE" -c "$cfg")
  if ! "${g[@]}" status >/dev/null 2>&1; then
    log "starting Garage (S3 on 127.0.0.1:3900)"
    nohup "${g[@]}" server >"$dir/garage.log" 2>&1 &
    for _ in $(seq 100); do "${g[@]}" status >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  if "${g[@]}" status 2>/dev/null | grep -q "NO ROLE ASSIGNED"; then
    local node
    node=$("${g[@]}" node id -q 2>/dev/null | cut -d@ -f1)
    "${g[@]}" layout assign -z dc1 -c 1G "$node" >/dev/null
    "${g[@]}" layout apply --version 1 >/dev/null
  fi
  "${g[@]}" bucket info hatch >/dev/null 2>&1 || "${g[@]}" bucket create hatch >/dev/null
  if ! "${g[@]}" key info hatch >/dev/null 2>&1; then
    "${g[@]}" key create hatch >/dev/null
    "${g[@]}" bucket allow --read --write --owner hatch --key hatch >/dev/null
  fi
  local info
  info=$("${g[@]}" key info hatch --show-secret)
  echo "export HATCH_S3_ENDPOINT=http://127.0.0.1:3900"
  echo "export HATCH_S3_BUCKET=hatch"
  echo "export HATCH_S3_REGION=garage"
  echo "export HATCH_S3_ACCESS_KEY_ID=$(awk '/Key ID:/ {print $3}' <<<"$info")"
  echo "export HATCH_S3_SECRET_ACCESS_KEY=$(awk '/Secret key:/ {print $3}' <<<"$info")"
}
