#!/usr/bin/env bash
# Full walferry test run, from a fresh Debian 12 machine (root; Rust toolchain, cargo-nextest,
# node/npm and python3 present) to `cargo nextest run --workspace`.
#
#   1. PostgreSQL 15 from Debian (skipped when /usr/lib/postgresql/15/bin/postgres exists)
#   2. Azurite (npm) into .tools/azurite, moto[server] (PyPI) into the venv .tools/moto
#   3. one shared Azurite + moto for the whole run (WALFERRY_SHARED_EMULATORS=0: let each
#      test process start its own)
#   4. cargo build of formats/fuzz, when it exists, and of the walferry binaries
#   5. cargo nextest run --workspace --no-fail-fast  (cargo test when nextest is missing)
#
# Idempotent: installed tools are reused (a .installed marker is written last).
# Extra arguments go to the test runner, e.g. `scripts/test.sh testkit` (a name filter).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
TOOLS=$ROOT/.tools
AZURITE_VERSION=${AZURITE_VERSION:-3.35.0}
MOTO_VERSION=${MOTO_VERSION:-5.2.5}
export WALFERRY_REQUIRE_EMULATORS=${WALFERRY_REQUIRE_EMULATORS:-1}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

SUDO=
if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
fi

now() { date +%s.%N; }
TIMINGS=()
STEP=
STEP_T0=
# begin NAME ... end [EXIT]: print and remember how long a step took. A failing command in
# between stops the script (set -e); the EXIT trap then names the step.
begin() {
  STEP=$1
  STEP_T0=$(now)
  echo "==> $STEP"
}
end() {
  local rc=${1:-0} dt
  dt=$(awk -v a="$STEP_T0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
  echo "<== $STEP: ${dt}s (exit $rc)"
  TIMINGS+=("$(printf '%-24s %8ss  exit %s' "$STEP" "$dt" "$rc")")
  STEP=
}
print_timings() {
  echo "---- step timings ----"
  local t
  for t in "${TIMINGS[@]}"; do echo "$t"; done
}

APT_UPDATED=
apt_install() {
  if [ -z "$APT_UPDATED" ]; then
    $SUDO apt-get update -q
    APT_UPDATED=1
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

install_postgres() {
  if [ -x /usr/lib/postgresql/15/bin/postgres ] && id postgres >/dev/null 2>&1; then
    echo "postgresql 15 already installed"
    return 0
  fi
  # (The package may create and start a "main" cluster on 5432; tests use their own.)
  apt_install postgresql postgresql-contrib
}

install_azurite() {
  local dir=$TOOLS/azurite
  if [ -e "$dir/.installed" ] && [ -x "$dir/node_modules/.bin/azurite-blob" ]; then
    echo "azurite already installed: $(cat "$dir/.installed")"
    return 0
  fi
  rm -rf "$dir"
  mkdir -p "$dir"
  echo '{ "name": "walferry-tools-azurite", "private": true }' >"$dir/package.json"
  (cd "$dir" && npm install --no-audit --no-fund --loglevel=error "azurite@$AZURITE_VERSION")
  "$dir/node_modules/.bin/azurite-blob" --version >"$dir/.installed"
}

install_moto() {
  local dir=$TOOLS/moto
  if [ -e "$dir/.installed" ] && [ -x "$dir/bin/moto_server" ]; then
    echo "moto already installed: $(cat "$dir/.installed")"
    return 0
  fi
  rm -rf "$dir"
  # Debian's python3 has no venv/ensurepip without python3-venv.
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_install python3-venv
  fi
  python3 -m venv "$dir"
  "$dir/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION"
  "$dir/bin/pip" show moto | awk '/^Version/ { print "moto " $2 }' >"$dir/.installed"
}

# ---- shared emulators -------------------------------------------------------------------

EMU_DIR=
EMU_PIDS=()
on_exit() {
  local rc=$? pid
  if [ -n "$STEP" ]; then
    echo "!!! step '$STEP' failed (exit $rc)"
    end "$rc"
    print_timings
  fi
  for pid in "${EMU_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${EMU_PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [ -n "$EMU_DIR" ]; then rm -rf "$EMU_DIR"; fi
}
trap on_exit EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_emulator NAME READY_TEXT_PREFIX CMD... (CMD may use the literal word PORT)
# Sets EMU_URL. Waits for the ready line naming our port, so another process on the
# same port cannot fool it.
start_emulator() {
  local name=$1 ready=$2
  shift 2
  local attempt port log pid i args a
  for attempt in 1 2 3 4; do
    port=$(free_port)
    log=$EMU_DIR/$name.$port.log
    args=()
    for a in "$@"; do args+=("${a//PORT/$port}"); done
    (cd "$EMU_DIR" && exec "${args[@]}") </dev/null >"$log" 2>&1 &
    pid=$!
    for i in $(seq 1 600); do
      if grep -qF "$ready$port" "$log" 2>/dev/null && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        EMU_PIDS+=("$pid")
        EMU_URL=http://127.0.0.1:$port
        echo "$name listening on $EMU_URL (pid $pid)"
        return 0
      fi
      if ! kill -0 "$pid" 2>/dev/null; then break; fi
      sleep 0.1
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    echo "$name failed to start on port $port (attempt $attempt):"
    tail -n 20 "$log" || true
    if ! grep -qiE 'EADDRINUSE|address already in use|is in use' "$log"; then
      return 1
    fi
  done
  return 1
}

start_shared_emulators() {
  if [ "${WALFERRY_SHARED_EMULATORS:-1}" = 0 ]; then
    echo "WALFERRY_SHARED_EMULATORS=0: each test process starts its own emulators"
    return 0
  fi
  EMU_DIR=$(mktemp -d "${TMPDIR:-/tmp}/walferry-emulators.XXXXXX")
  if [ -z "${WALFERRY_AZURITE_URL:-}" ]; then
    start_emulator azurite "listens on http://127.0.0.1:" \
      "$TOOLS/azurite/node_modules/.bin/azurite-blob" --blobHost 127.0.0.1 --blobPort PORT \
      --inMemoryPersistence --skipApiVersionCheck --loose --silent \
      --disableTelemetry --disableProductStyleUrl
    export WALFERRY_AZURITE_URL=$EMU_URL
  fi
  if [ -z "${WALFERRY_S3_URL:-}" ]; then
    start_emulator moto "Running on http://127.0.0.1:" \
      "$TOOLS/moto/bin/moto_server" -H 127.0.0.1 -p PORT
    export WALFERRY_S3_URL=$EMU_URL
  fi
}

# ---- tests --------------------------------------------------------------------------------

# The end-to-end tests run the real binaries; build them once here instead of in every
# test process (tests/src/bins.rs builds them itself when WALFERRY_BIN_DIR is unset).
build_bins() {
  cargo build --workspace --bins
  export WALFERRY_BIN_DIR=${CARGO_TARGET_DIR:-$ROOT/target}/debug
}

run_tests() {
  if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast "$@"
  else
    echo "cargo-nextest not found; falling back to cargo test"
    cargo test --workspace --no-fail-fast "$@"
  fi
}

build_fuzz() {
  if [ ! -f formats/fuzz/Cargo.toml ]; then
    echo "formats/fuzz/Cargo.toml not present; skipping"
    return 0
  fi
  # libfuzzer-sys compiles C++.
  if ! command -v c++ >/dev/null 2>&1; then
    apt_install g++
  fi
  # Share the workspace target dir so the dependencies already built are reused.
  cargo build --manifest-path formats/fuzz/Cargo.toml --bins --target-dir "$ROOT/target"
}

echo "walferry test run in $ROOT (WALFERRY_REQUIRE_EMULATORS=$WALFERRY_REQUIRE_EMULATORS)"
mkdir -p "$TOOLS"
begin "install postgresql"; install_postgres; end
begin "install azurite"; install_azurite; end
begin "install moto"; install_moto; end
begin "start shared emulators"; start_shared_emulators; end

status=0
rc=0
begin "build fuzz targets"; build_fuzz || rc=$?; end "$rc"
if [ "$rc" -ne 0 ]; then status=$rc; fi
begin "build binaries"; build_bins; end
rc=0
begin "cargo tests"; run_tests "$@" || rc=$?; end "$rc"
if [ "$rc" -ne 0 ]; then status=$rc; fi
print_timings
exit "$status"
