#!/usr/bin/env bash
# walferry in two minutes: point-in-time restore after a destructive mistake.
#
# From a fresh Debian 12 machine (root, Rust toolchain present), with no manual steps:
#   1. installs PostgreSQL 15 from Debian when it is missing, builds the release binaries
#   2. starts a throwaway cluster (initdb into a temp dir, private unix socket, no TCP)
#   3. creates an encrypted file:// repository and starts `walferry-agent run` streaming WAL
#   4. creates a table, takes a base backup, inserts more rows, notes the time T
#   5. deletes every row (DELETE without WHERE), waits until the stream has stored it
#   6. `walferry-restore --to T --start` into a new directory on another port
#   7. shows the row counts: 0 in the source, all of them in the restored cluster
# Everything (servers, agent, temp dirs) is stopped and removed on exit, whatever happens.
# Idempotent: every run uses its own temp dir; installed packages and builds are reused.
#
# Env: WALFERRY_DEMO_KEEP=1  keep the temp dir (servers and agent are still stopped)
#      PG_BINDIR             PostgreSQL server binaries (default: /usr/lib/postgresql/15/bin)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

if [ -t 1 ]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD= PLAIN=; fi
say() { printf '\n%s==> %s%s\n' "$BOLD" "$*" "$PLAIN"; }
note() { printf '    %s\n' "$*"; }
die() { printf '\ndemo: %s\n' "$*" >&2; exit 1; }

SUDO=
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi

# ---- 1. prerequisites -------------------------------------------------------------------
say "Prerequisites"
if [ -x "${PG_BINDIR:-/usr/lib/postgresql/15/bin}/postgres" ] && id postgres >/dev/null 2>&1; then
  note "PostgreSQL found in ${PG_BINDIR:-/usr/lib/postgresql/15/bin}"
else
  note "installing PostgreSQL 15 (apt-get)"
  $SUDO apt-get update -q
  # (The package may create and start a "main" cluster on port 5432; the demo does not touch it.)
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    postgresql postgresql-contrib
fi
BIN=${PG_BINDIR:-/usr/lib/postgresql/15/bin}
[ -x "$BIN/postgres" ] || die "no PostgreSQL server binaries in $BIN (set PG_BINDIR)"

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  PATH=$HOME/.cargo/bin:$PATH
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found: install a Rust toolchain (https://rustup.rs)"
note "building walferry-agent and walferry-restore (cargo build --release)"
cargo build --release -q -p walferry-agent -p walferry-restore
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

# When root, every PostgreSQL program runs as the postgres user (the server refuses root).
if [ "$(id -u)" -eq 0 ]; then
  PGUSER_OS=postgres
  as_pg() { runuser -u postgres -- "$@"; }
else
  PGUSER_OS=$(id -un)
  as_pg() { "$@"; }
fi

# ---- throwaway world, removed on exit -----------------------------------------------------
WORK=$(mktemp -d /tmp/walferry-demo.XXXXXX)
chmod 755 "$WORK" # the postgres user must reach the binaries, the key and the repository
SRC=$WORK/source          # the cluster we will damage
DST=$WORK/restored        # where it comes back
SOCK=$WORK/sock           # private unix socket dir for both servers
REPO_DIR=$WORK/repo
REPO=file://$REPO_DIR
KEY=$WORK/master.key
AGENT_LOG=$WORK/agent.log
SRC_LOG=$WORK/logs/source.log
mkdir -p "$SOCK" "$WORK/bin" "$WORK/logs"
# restore_command runs `walferry-restore wal-fetch` as the server's user: give it a copy
# of the binaries it can read, wherever this checkout lives.
install -m 755 "$TARGET_DIR/release/walferry-agent" "$TARGET_DIR/release/walferry-restore" "$WORK/bin/"
AGENT=$WORK/bin/walferry-agent
RESTORE=$WORK/bin/walferry-restore
chown "$PGUSER_OS" "$SOCK" "$WORK/logs"

# Both servers listen only on the private socket dir, so any port numbers work; pick
# two distinct ones anyway so that the two clusters are easy to tell apart.
PORT_SRC=$((20000 + RANDOM % 20000))
PORT_DST=$((PORT_SRC + 1))

AGENT_PID=
RESTORE_STARTED=
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [ -n "$AGENT_PID" ] && kill -0 "$AGENT_PID" 2>/dev/null; then
    kill -TERM "$AGENT_PID" 2>/dev/null
    wait "$AGENT_PID" 2>/dev/null
  fi
  if [ -n "$RESTORE_STARTED" ] && [ -d "$DST" ] && [ ! -f "$DST/postmaster.pid" ]; then
    # A failed `--start` may leave a server that is still starting: give it a moment to
    # write postmaster.pid, so that it can be stopped before its directory is removed.
    for _ in $(seq 1 50); do [ -f "$DST/postmaster.pid" ] && break; sleep 0.1; done
  fi
  for d in "$DST" "$SRC"; do
    if [ -f "$d/postmaster.pid" ]; then
      as_pg "$BIN/pg_ctl" -D "$d" -m fast -w -t 30 stop >/dev/null 2>&1 ||
        as_pg "$BIN/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1
    fi
  done
  if [ "$rc" -ne 0 ]; then
    echo
    echo "demo FAILED (exit $rc). Last lines of the logs:"
    for f in "$AGENT_LOG" "$SRC_LOG" "$DST/walferry-recovery.log"; do
      [ -f "$f" ] && { echo "--- $f"; tail -n 15 "$f"; }
    done
  fi
  if [ "${WALFERRY_DEMO_KEEP:-0}" = 1 ]; then
    echo "kept $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

psql_at() { # PORT SQL
  as_pg "$BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$SOCK" -p "$1" -U postgres -d postgres -c "$2"
}
show() { # PORT SQL: print the query and its result
  printf '    %s=# %s\n' "$1" "$2"
  as_pg "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$SOCK" -p "$1" -U postgres -d postgres -c "$2" |
    sed -e '/^$/d' -e 's/^/      /'
}

# ---- 2. a throwaway cluster ---------------------------------------------------------------
say "Start a throwaway PostgreSQL $("$BIN/postgres" --version | awk '{print $3}') cluster in $SRC (socket $SOCK, port $PORT_SRC)"
install -d -o "$PGUSER_OS" -m 700 "$SRC"
as_pg "$BIN/initdb" -D "$SRC" -U postgres --auth=trust --no-instructions >/dev/null
# In postgresql.conf (not on the command line) so that the restored copy inherits them.
cat >>"$SRC/postgresql.conf" <<EOF

# walferry demo
listen_addresses = ''
unix_socket_directories = '$SOCK'
port = $PORT_SRC
EOF
as_pg "$BIN/pg_ctl" -D "$SRC" -l "$SRC_LOG" -w start >/dev/null
note "wal_level=$(psql_at "$PORT_SRC" 'show wal_level'), max_wal_senders=$(psql_at "$PORT_SRC" 'show max_wal_senders'): ready for streaming replication"

# ---- 3. repository and agent --------------------------------------------------------------
say "Create an encrypted repository at $REPO"
"$AGENT" keygen --out "$KEY"
chown "$PGUSER_OS" "$KEY" # mode 0600; restore_command (running as postgres) reads it
"$AGENT" init --repo "$REPO" --key-file "$KEY"

PG_CONN="host=$SOCK port=$PORT_SRC user=postgres dbname=postgres"
say "Start the agent: walferry-agent run --repo $REPO --key-file master.key --pg '$PG_CONN' --rpo 200ms"
"$AGENT" run --repo "$REPO" --key-file "$KEY" --pg "$PG_CONN" --rpo 200ms >"$AGENT_LOG" 2>&1 &
AGENT_PID=$!
for _ in $(seq 1 100); do
  if [ "$(psql_at "$PORT_SRC" "select count(*) from pg_stat_replication where state = 'streaming'")" = 1 ]; then
    break
  fi
  kill -0 "$AGENT_PID" 2>/dev/null || die "the agent exited; see $AGENT_LOG"
  sleep 0.1
done
[ "$(psql_at "$PORT_SRC" "select count(*) from pg_stat_replication where state = 'streaming'")" = 1 ] ||
  die "the agent did not start streaming within 10s"
note "streaming through slot '$(psql_at "$PORT_SRC" "select slot_name from pg_replication_slots")' (agent pid $AGENT_PID)"

# ---- 4. data, backup, more data, time T ---------------------------------------------------
say "Create a table with 1000 orders"
psql_at "$PORT_SRC" "create table orders (id bigint primary key, customer text, amount numeric(10,2), created_at timestamptz default now());
  insert into orders (id, customer, amount) select g, 'customer-' || (g % 97), round((random() * 500)::numeric, 2) from generate_series(1, 1000) g;"
show "$PORT_SRC" "select count(*) as orders, sum(amount) as total from orders"

say "Take a base backup: walferry-agent backup --repo $REPO --key-file master.key --pg '$PG_CONN'"
BACKUP_ID=$("$AGENT" backup --repo "$REPO" --key-file "$KEY" --pg "$PG_CONN" 2>"$WORK/backup.err") ||
  { cat "$WORK/backup.err" >&2; die "backup failed"; }
grep -v -E 'INFO|^\s*$' "$WORK/backup.err" | sed 's/^/    /' || true
note "backup id: $BACKUP_ID"

say "Insert 500 more orders after the backup (only the streamed WAL has these)"
psql_at "$PORT_SRC" "insert into orders (id, customer, amount) select g, 'customer-' || (g % 97), round((random() * 500)::numeric, 2) from generate_series(1001, 1500) g;"
show "$PORT_SRC" "select count(*) as orders, sum(amount) as total from orders"
TOTAL_BEFORE=$(psql_at "$PORT_SRC" "select count(*) || ' rows, total ' || sum(amount) from orders")

T=$(psql_at "$PORT_SRC" "select to_char(now() at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'")
say "Note the time: T = $T"
sleep 1

# ---- 5. the mistake -----------------------------------------------------------------------
say "Oops: DELETE FROM orders; (no WHERE)"
show "$PORT_SRC" "delete from orders"
show "$PORT_SRC" "select count(*) as orders from orders"

LSN=$(psql_at "$PORT_SRC" "select pg_current_wal_lsn()")
note "waiting until the agent reports WAL up to $LSN as stored in the repository"
stored=
for _ in $(seq 1 300); do
  stored=$(psql_at "$PORT_SRC" "select coalesce(bool_or(flush_lsn >= '$LSN'), false) from pg_stat_replication")
  [ "$stored" = t ] && break
  kill -0 "$AGENT_PID" 2>/dev/null || die "the agent exited; see $AGENT_LOG"
  sleep 0.1
done
[ "$stored" = t ] || die "the agent did not store WAL up to $LSN within 30s"
note "stored: the DELETE is in the repository (flush_lsn $(psql_at "$PORT_SRC" "select flush_lsn from pg_stat_replication"))"

say "What the repository holds: walferry-agent list"
"$AGENT" list --repo "$REPO" --key-file "$KEY" 2>/dev/null | sed 's/^/    /'

# ---- 6. restore to T ----------------------------------------------------------------------
say "Restore to T: walferry-restore --repo $REPO --key-file master.key --to '$T' --pgdata $DST --start --pg-option port=$PORT_DST --pg-option unix_socket_directories=$SOCK"
RESTORE_STARTED=1
if ! "$RESTORE" --repo "$REPO" --key-file "$KEY" --to "$T" --pgdata "$DST" --start \
  --pg-option "port=$PORT_DST" --pg-option "unix_socket_directories=$SOCK" 2>&1 | sed 's/^/    /'; then
  die "restore failed"
fi

# ---- 7. the proof -------------------------------------------------------------------------
say "The source cluster (port $PORT_SRC), after the mistake"
show "$PORT_SRC" "select count(*) as orders from orders"
say "The restored cluster (port $PORT_DST), as it was at T"
show "$PORT_DST" "select count(*) as orders, sum(amount) as total from orders"
SRC_N=$(psql_at "$PORT_SRC" "select count(*) from orders")
DST_ALL=$(psql_at "$PORT_DST" "select count(*) || ' rows, total ' || sum(amount) from orders")
DST_N=$(psql_at "$PORT_DST" "select count(*) from orders")
if [ "$SRC_N" = 0 ] && [ "$DST_N" = 1500 ] && [ "$DST_ALL" = "$TOTAL_BEFORE" ]; then
  say "OK: source has $SRC_N rows; restored has $DST_ALL (the same as at T)"
else
  die "unexpected counts: source $SRC_N rows, restored '$DST_ALL', at T '$TOTAL_BEFORE'"
fi

say "Stop the agent (SIGTERM drains and exits 0), both servers, and remove $WORK"
kill -TERM "$AGENT_PID"
if wait "$AGENT_PID"; then note "agent exited 0"; else die "agent exited $?"; fi
AGENT_PID=
