#!/usr/bin/env bash
# walferry vs pgBackRest 2.45 vs pg_basebackup, side by side in one run on the same data.
#
#   benches/compare.sh [--quick] [--datasets pgbench,mixed] [--runs N] [--drop-caches]
#                      [--pgbench-seconds N] [--keep]
#
# For each dataset, in a throwaway cluster (initdb into a temp dir, private unix socket):
#   pgbench  `pgbench -i -s 100` (~1.6 GB, compresses ~20x: flatters every tool)
#   mixed    ~1.6 GB table of random-ish orders (ids, hex refs, amounts, timestamps, enums,
#            e-mails, word salad) that compresses ~2.9x with zstd -3, like real data
# it measures, interleaving the tools run by run (A B C A B C), after a CHECKPOINT and
# once WAL archiving and streaming have caught up:
#   1. full backup wall time: walferry (fresh repository each run; BASE_BACKUP, and
#      --pgdata reading the data directory directly) vs pgBackRest
#      (--type=full) vs pg_basebackup -Ft --checkpoint=fast server-zstd:level=3,workers=2
#   2. a second backup after a change, walferry vs pgBackRest --type=incr:
#        small 2.5%:   UPDATE of 2.5% of the main table's rows, contiguous (about 5% of its
#                      pages: the old versions' and as many new ones at the end)
#        clustered 5%: UPDATE of the first 5% of the main table's rows (5% of its pages,
#                      contiguous, as a hot set of recent rows is)
#        scattered 5%: UPDATE of every row on every 20th heap page (5% of the pages,
#                      spread evenly over the table)
#        pgbench -T N: random single-row updates (TPC-B, or a random-update script)
#      (each also reports the share of the main table's and its indexes' 8 KiB pages whose
#      LSN moved, by pageinspect: what the change touched on disk; an UPDATE also writes
#      the new row versions at the end of the table, so "5% of the rows" touches more)
#      walferry: bytes uploaded vs its full backup, time vs its full backup
#   3. restore wall time to a running, promoted cluster: walferry-restore --to latest
#      --start vs pgbackrest restore + pg_ctl start + wait until recovery has ended
#   4. peak RSS (/usr/bin/time -v "Maximum resident set size") of walferry backup and restore
#
# Settings: pgBackRest compress-type=zst, compress-level=3, process-max=2,
# repo1-cipher-type=aes-256-cbc, start-fast=y, archive_command=archive-push (sync);
# walferry: encrypted repository (AES-256-GCM, zstd 3), `walferry-agent run` streaming WAL
# for the whole run. Both archive the same cluster at the same time, as in production.
#
# --quick: scale 10 (~160 MB per dataset), 10 s of pgbench: a sanity run of a few minutes.
# As root (needed for apt-get and drop_caches), PostgreSQL and pgBackRest run as `postgres`.
# Everything is stopped and removed on exit (--keep: keep the temp dir for inspection).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

QUICK=0
DATASETS=pgbench,mixed
RUNS=2
DROP_CACHES=0
KEEP=0
PGBENCH_SECONDS=
while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=1 ;;
    --datasets) DATASETS=$2; shift ;;
    --runs) RUNS=$2; shift ;;
    --drop-caches) DROP_CACHES=1 ;;
    --pgbench-seconds) PGBENCH_SECONDS=$2; shift ;;
    --keep) KEEP=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "compare: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$QUICK" = 1 ]; then
  SCALE=10 MIXED_ROWS=920000 PGBENCH_SECONDS=${PGBENCH_SECONDS:-10}
else
  SCALE=100 MIXED_ROWS=9200000 PGBENCH_SECONDS=${PGBENCH_SECONDS:-30}
fi
[ "$(id -u)" -eq 0 ] || { echo "compare: run as root (apt-get, runuser, drop_caches)" >&2; exit 2; }

log() { printf '%s  %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "compare: $*"; exit 1; }
now() { date +%s.%N; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
calc() { awk "BEGIN { printf \"%.${2:-2}f\", $1 }"; }

# ---- prerequisites --------------------------------------------------------------------
need_pkgs=()
[ -x /usr/lib/postgresql/15/bin/postgres ] || need_pkgs+=(postgresql postgresql-contrib)
command -v pgbackrest >/dev/null || need_pkgs+=(pgbackrest)
[ -x /usr/bin/time ] || need_pkgs+=(time)
command -v zstd >/dev/null || need_pkgs+=(zstd)
command -v python3 >/dev/null || need_pkgs+=(python3)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]}"
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_pkgs[@]}" >&2
fi
BIN=${PG_BINDIR:-/usr/lib/postgresql/15/bin}
if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then PATH=$HOME/.cargo/bin:$PATH; fi
log "building walferry (release)"
cargo build --release -q -p walferry-agent -p walferry-restore >&2
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

as_pg() { runuser -u postgres -- "$@"; }

WORK=$(mktemp -d "${WALFERRY_BENCH_DIR:-/tmp}/walferry-compare.XXXXXX")
chmod 755 "$WORK"
mkdir -p "$WORK/bin"
install -m 755 "$TARGET_DIR/release/walferry-agent" "$TARGET_DIR/release/walferry-restore" "$WORK/bin/"
WF_AGENT=$WORK/bin/walferry-agent
WF_RESTORE=$WORK/bin/walferry-restore
PGBR_VERSION=$(pgbackrest version | awk '{print $2}')
PG_VERSION=$("$BIN/postgres" --version | awk '{print $3}')

# Current dataset's state (set by setup_cluster).
D= PGDATA= SOCK= PORT= CONF= WF_REPO= WF_KEY= AGENT_PID= WF_LEVEL=
RESULTS=$WORK/results.md
: >"$RESULTS"

stop_pg() { # DIR
  if [ -f "$1/postmaster.pid" ]; then
    as_pg "$BIN/pg_ctl" -D "$1" -m fast -w -t 60 stop >/dev/null 2>&1 ||
      as_pg "$BIN/pg_ctl" -D "$1" -m immediate -w stop >/dev/null 2>&1 || true
  fi
}
stop_agent() {
  if [ -n "$AGENT_PID" ] && kill -0 "$AGENT_PID" 2>/dev/null; then
    kill -TERM "$AGENT_PID" 2>/dev/null || true
    wait "$AGENT_PID" 2>/dev/null || true
  fi
  AGENT_PID=
}
teardown_dataset() {
  stop_agent
  if [ -n "$D" ]; then
    local d
    for d in "$D"/restore-*; do [ -d "$d" ] && stop_pg "$d"; done
    stop_pg "$PGDATA"
    [ "$KEEP" = 1 ] || rm -rf "$D"
  fi
  D=
}
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  teardown_dataset
  if [ "$rc" -ne 0 ] && [ -s "$RESULTS" ]; then
    echo "---- partial results ----"
    cat "$RESULTS"
  fi
  if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

sql() { as_pg "$BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$SOCK" -p "${2:-$PORT}" -d postgres -c "$1"; }

drop_caches() {
  if [ "$DROP_CACHES" = 1 ]; then
    sync
    echo 3 >/proc/sys/vm/drop_caches
  fi
}

# CHECKPOINT, switch WAL, then wait until pgBackRest's archive_command and walferry's
# stream have both caught up, so that no backlog lands in the next measurement.
settle() {
  sql "checkpoint" >/dev/null
  sql "select pg_switch_wal()" >/dev/null
  local lsn i
  lsn=$(sql "select pg_current_wal_lsn()")
  for i in $(seq 1 6000); do
    # An autovacuum started by the last change (after 150k updates, say) would compete
    # with whichever tool runs next, and add WAL that only one of them replays.
    if ! compgen -G "$PGDATA/pg_wal/archive_status/*.ready" >/dev/null &&
      [ "$(sql "select count(*) from pg_stat_activity where backend_type = 'autovacuum worker'")" = 0 ] &&
      [ "$(sql "select coalesce(bool_or(flush_lsn >= '$lsn'), false) from pg_stat_replication where application_name <> 'pg_basebackup'")" = t ]; then
      # Write back what earlier steps left dirty (repositories, restored copies), so the
      # kernel's writeback of it does not land in the next measurement.
      sync
      return 0
    fi
    [ -n "$AGENT_PID" ] && ! kill -0 "$AGENT_PID" 2>/dev/null && die "walferry-agent run exited; see $D/agent.log"
    sleep 0.1
  done
  die "archiving or streaming did not catch up within 10 minutes"
}

# ---- cluster + repositories -----------------------------------------------------------
setup_cluster() { # NAME
  D=$WORK/$1
  PGDATA=$D/data
  SOCK=$D/sock
  PORT=$((20000 + RANDOM % 20000))
  CONF=$D/pgbackrest.conf
  WF_REPO=file://$D/wf-repo
  WF_KEY=$D/master.key
  install -d -o postgres -m 755 "$D" "$SOCK" "$D/logs"
  install -d -o postgres -m 700 "$PGDATA" "$D/pgbr-repo" "$D/pgbr-log" "$D/pgbr-lock" "$D/pgbr-spool"
  as_pg "$BIN/initdb" -D "$PGDATA" -U postgres --auth=trust --no-instructions >/dev/null
  cat >"$CONF" <<EOF
[global]
repo1-path=$D/pgbr-repo
repo1-retention-full=99
repo1-cipher-type=aes-256-cbc
repo1-cipher-pass=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
compress-type=zst
compress-level=3
process-max=2
start-fast=y
log-path=$D/pgbr-log
lock-path=$D/pgbr-lock
spool-path=$D/pgbr-spool
log-level-console=warn
log-level-file=info

[bench]
pg1-path=$PGDATA
pg1-socket-path=$SOCK
pg1-port=$PORT
pg1-user=postgres
EOF
  chown postgres "$CONF"
  chmod 600 "$CONF"
  # In postgresql.conf, so restored copies inherit them (they override port and archiving).
  cat >>"$PGDATA/postgresql.conf" <<EOF

# benches/compare.sh
listen_addresses = ''
unix_socket_directories = '$SOCK'
port = $PORT
shared_buffers = 512MB
max_wal_size = 16GB
checkpoint_timeout = 1h
archive_mode = on
archive_command = 'pgbackrest --config=$CONF --stanza=bench archive-push %p'
EOF
  as_pg "$BIN/pg_ctl" -D "$PGDATA" -l "$D/server.log" -w start >/dev/null
  as_pg pgbackrest --config="$CONF" --stanza=bench stanza-create >/dev/null
  "$WF_AGENT" keygen --out "$WF_KEY" 2>/dev/null
  chown postgres "$WF_KEY"
  WF_LEVEL=$("$WF_AGENT" init --repo "$WF_REPO" --key-file "$WF_KEY" | sed -n 's/.*zstd level \([0-9]*\).*/\1/p')
  "$WF_AGENT" run --repo "$WF_REPO" --key-file "$WF_KEY" \
    --pg "host=$SOCK port=$PORT user=postgres dbname=postgres application_name=walferry" \
    >"$D/agent.log" 2>&1 &
  AGENT_PID=$!
}

# ---- datasets -------------------------------------------------------------------------
MAIN_TABLE=
load_pgbench() {
  log "pgbench -i -s $SCALE"
  as_pg "$BIN/pgbench" -i -q -s "$SCALE" -h "$SOCK" -p "$PORT" postgres >"$D/pgbench-init.log" 2>&1
  MAIN_TABLE=pgbench_accounts
  MAIN_KEY=aid
  MAIN_BUMP=abalance
}
load_mixed() {
  log "mixed table: $MIXED_ROWS rows (2 sessions)"
  sql "create function wf_word() returns text language sql volatile parallel safe as
    \$\$ select (array['order','delayed','customer','asked','for','a','refund','gift','wrap','express',
      'shipping','address','changed','warehouse','north','south','backorder','invoice','sent','paid','by',
      'card','voucher','note','the','parcel','arrived','damaged','replacement','requested','priority',
      'standard','pickup','return'])[1 + floor(random() * 34)::int] \$\$;
  create table mixed (
    id bigint not null, customer_id int not null, ref text not null, amount numeric(12,2) not null,
    qty int not null, created_at timestamptz not null, status text not null, email text not null,
    currency text not null, channel text not null, note text, flagged boolean not null);"
  local half=$((MIXED_ROWS / 2)) from to pids=() p
  for part in 0 1; do
    from=$((part * half + 1))
    to=$(((part + 1) * half))
    [ "$part" = 1 ] && to=$MIXED_ROWS
    sql "insert into mixed select g, (random()*1e6)::int, substr(md5(random()::text), 1, 8),
      round((random()*100000)::numeric, 2), (random()*1000)::int,
      timestamptz '2024-01-01' + random() * interval '400 days',
      (array['new','paid','shipped','delivered','cancelled','refunded'])[1 + floor(random()*6)::int],
      'customer-' || (random()*50000)::int || '@example.com',
      (array['EUR','USD','GBP','CHF'])[1 + floor(random()*4)::int],
      (array['web','mobile','store','phone'])[1 + floor(random()*4)::int],
      wf_word() || ' ' || wf_word() || ' ' || wf_word() || ' ' || wf_word() || ' ' || wf_word()
        || ' ' || wf_word() || ' ' || wf_word(),
      random() < 0.3
      from generate_series($from, $to) g order by g" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  sql "alter table mixed add primary key (id)"
  MAIN_TABLE=mixed
  MAIN_KEY=id
  MAIN_BUMP=qty
}

# zstd -3 ratio of the main table's heap (all its segment files).
heap_ratio() {
  local base files a c
  base=$PGDATA/$(sql "select pg_relation_filepath('$MAIN_TABLE')")
  files=$(ls "$base" "$base".[0-9]* 2>/dev/null)
  # shellcheck disable=SC2086
  a=$(cat $files | wc -c)
  # shellcheck disable=SC2086
  c=$(cat $files | zstd -3 -q -c -T1 | wc -c)
  calc "$a / $c" 1
}

# ---- one measurement each ------------------------------------------------------------
# walferry backup into REPO (EXTRA: e.g. --pgdata DIR); sets SECS, UP_MB (uploaded), RSS_MB
wf_backup() { # REPO [EXTRA...]
  drop_caches
  local t0 t1 id
  t0=$(now)
  /usr/bin/time -v -o "$D/time.out" "$WF_AGENT" backup --repo "$1" --key-file "$WF_KEY" \
    --pg "host=$SOCK port=$PORT user=postgres dbname=postgres" "${@:2}" >"$D/wf-backup.out" 2>"$D/wf-backup.err" ||
    { cat "$D/wf-backup.err" >&2; die "walferry backup failed"; }
  t1=$(now)
  SECS=$(sub "$t0" "$t1")
  RSS_MB=$(awk -F': ' '/Maximum resident set size/ { printf "%.0f", $2 / 1024 }' "$D/time.out")
  id=$(tail -n1 "$D/wf-backup.out")
  "$WF_AGENT" list --repo "$1" --key-file "$WF_KEY" --json 2>/dev/null >"$D/list.json"
  UP_MB=$(python3 -c 'import json,sys; b=[x for x in json.load(open(sys.argv[1]))["backups"] if x["id"]==sys.argv[2]][0]; print("%.1f" % (b["new_stored_bytes"]/1e6))' "$D/list.json" "$id")
  grep -E ' done: ' "$D/wf-backup.err" | sed 's/\x1b\[[0-9;]*m//g' | tail -n1 >>"$D/wf-summaries.log"
}
# pgBackRest backup; sets SECS, UP_MB (repository delta of that backup), RSS_MB
pgbr_backup() { # full|incr
  drop_caches
  local t0 t1
  t0=$(now)
  /usr/bin/time -v -o "$D/time.out" runuser -u postgres -- \
    pgbackrest --config="$CONF" --stanza=bench --type="$1" backup >"$D/pgbr-backup.out" 2>&1 ||
    { cat "$D/pgbr-backup.out" >&2; die "pgBackRest backup failed"; }
  t1=$(now)
  SECS=$(sub "$t0" "$t1")
  RSS_MB=$(awk -F': ' '/Maximum resident set size/ { printf "%.0f", $2 / 1024 }' "$D/time.out")
  UP_MB=$(as_pg pgbackrest --config="$CONF" --stanza=bench --output=json info |
    python3 -c 'import json,sys; b=json.load(sys.stdin)[0]["backup"][-1]; print("%.1f" % (b["info"]["repository"]["delta"]/1e6))')
}
# pg_basebackup -Ft with server-side zstd into a fresh dir; sets SECS, UP_MB
pgbb_backup() {
  drop_caches
  local out=$D/basebackup t0 t1
  rm -rf "$out"
  install -d -o postgres -m 700 "$out"
  t0=$(now)
  as_pg "$BIN/pg_basebackup" -h "$SOCK" -p "$PORT" -U postgres -D "$out" -Ft --checkpoint=fast \
    --compress=server-zstd:level=3,workers=2 >"$D/pgbb.out" 2>&1 ||
    { cat "$D/pgbb.out" >&2; die "pg_basebackup failed"; }
  t1=$(now)
  SECS=$(sub "$t0" "$t1")
  UP_MB=$(du -sb "$out" | awk '{ printf "%.1f", $1 / 1e6 }')
  rm -rf "$out"
}

# Percent of the 8 KiB pages of the main table and its indexes whose LSN is past LSN: what
# a change touched on disk (new row versions, the old versions' xmax, index entries, and
# hint bits, which with data checksums are WAL-logged and move the page LSN too).
pages_touched() { # LSN
  sql "select round(100.0 * count(*) filter (where (page_header(get_raw_page(r::text, b))).lsn > '$1') / count(*), 1)
       from (select oid::regclass as r, pg_relation_size(oid) as s from pg_class
             where oid = '$MAIN_TABLE'::regclass
                or oid in (select indexrelid from pg_index where indrelid = '$MAIN_TABLE'::regclass)) c,
            generate_series(0, c.s / 8192 - 1) as b"
}

# UPDATE the main table's rows matching WHERE (one integer column + 1).
bump_rows() { # WHERE
  sql "update $MAIN_TABLE set $MAIN_BUMP = $MAIN_BUMP + 1 where $1" >/dev/null
}

median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.2f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
max() { printf '%s\n' "$@" | sort -g | tail -n1; }

# walferry restore --to latest --start; sets SECS, RSS_MB
wf_restore() {
  local dir=$D/restore-wf port=$((PORT + 1)) t0 t1
  drop_caches
  t0=$(now)
  /usr/bin/time -v -o "$D/time.out" "$WF_RESTORE" --repo "$WF_REPO" --key-file "$WF_KEY" \
    --to latest --pgdata "$dir" --start --pg-option "port=$port" --pg-option archive_mode=off \
    >"$D/wf-restore.out" 2>&1 || { cat "$D/wf-restore.out" >&2; die "walferry restore failed"; }
  t1=$(now)
  SECS=$(sub "$t0" "$t1")
  RSS_MB=$(awk -F': ' '/Maximum resident set size/ { printf "%.0f", $2 / 1024 }' "$D/time.out")
  RESTORED_ROWS=$(sql "select count(*) from $MAIN_TABLE" "$port")
  grep -E '^restored ' "$D/wf-restore.out" >>"$D/wf-summaries.log" || true
  # walferry's own figure for writing the files; the rest is planning, start and recovery.
  FILES_SECS=$(sed -n 's/^restored .* in \([0-9.]*\)s .*/\1/p' "$D/wf-restore.out" | tail -n1)
  stop_pg "$dir"
  cp "$dir/walferry-recovery.log" "$D/logs/wf-recovery-$(date +%H%M%S).log" 2>/dev/null || true
  rm -rf "$dir"
}
# pgbackrest restore + start + wait until recovery has ended; sets SECS, RSS_MB
pgbr_restore() {
  local dir=$D/restore-pgbr port=$((PORT + 2)) t0 t1 i
  install -d -o postgres -m 700 "$dir"
  drop_caches
  t0=$(now)
  /usr/bin/time -v -o "$D/time.out" runuser -u postgres -- \
    pgbackrest --config="$CONF" --stanza=bench --pg1-path="$dir" restore >"$D/pgbr-restore.out" 2>&1 ||
    { cat "$D/pgbr-restore.out" >&2; die "pgBackRest restore failed"; }
  FILES_SECS=$(sub "$t0" "$(now)")
  printf "port = %s\narchive_mode = off\n" "$port" >>"$dir/postgresql.auto.conf"
  as_pg "$BIN/pg_ctl" -D "$dir" -l "$D/pgbr-restore.log" -w -t 3600 start >/dev/null
  for i in $(seq 1 36000); do
    [ "$(sql "select pg_is_in_recovery()" "$port" 2>/dev/null)" = f ] && break
    sleep 0.1
  done
  t1=$(now)
  SECS=$(sub "$t0" "$t1")
  RSS_MB=$(awk -F': ' '/Maximum resident set size/ { printf "%.0f", $2 / 1024 }' "$D/time.out")
  RESTORED_ROWS=$(sql "select count(*) from $MAIN_TABLE" "$port")
  stop_pg "$dir"
  cp "$D/pgbr-restore.log" "$D/logs/pgbr-recovery-$(date +%H%M%S).log" 2>/dev/null || true
  rm -rf "$dir"
}

# ---- the comparison for one dataset --------------------------------------------------
run_dataset() { # NAME
  local name=$1
  log "==== dataset $name"
  setup_cluster "$name"
  "load_$name"
  sql "vacuum (freeze, analyze)"
  settle
  local data_mb table_mb ratio rows
  data_mb=$(du -sb --exclude=pg_wal "$PGDATA" | awk '{ printf "%.0f", $1 / 1e6 }')
  table_mb=$(sql "select pg_total_relation_size('$MAIN_TABLE') / 1000000")
  ratio=$(heap_ratio)
  rows=$(sql "select count(*) from $MAIN_TABLE")
  log "$name: data dir $data_mb MB (without pg_wal), $MAIN_TABLE $table_mb MB with indexes, heap zstd -3 ratio ${ratio}x"

  # 1. full backups, interleaved
  local r wf_t=() wf_up=() wf_rss=() br_t=() br_up=() br_rss=() bb_t=() bb_up=() w3_t=() w3_up=() wl_t=() wl_up=()
  for r in $(seq 1 "$RUNS"); do
    local repo=$WF_REPO
    if [ "$r" -gt 1 ]; then # a fresh repository: a real full backup, no dedup against run 1
      repo=file://$D/wf-scratch-$r
      "$WF_AGENT" init --repo "$repo" --key-file "$WF_KEY" >/dev/null
    fi
    settle
    wf_backup "$repo"
    wf_t+=("$SECS") wf_up+=("$UP_MB") wf_rss+=("$RSS_MB")
    log "full run $r: walferry $SECS s ($UP_MB MB uploaded, RSS $RSS_MB MB)"
    [ "$r" -gt 1 ] && rm -rf "${repo#file://}"
    # The same, into a repository made with the peers' zstd level.
    repo=file://$D/wf-zstd3
    "$WF_AGENT" init --repo "$repo" --key-file "$WF_KEY" --compression-level 3 >/dev/null
    settle
    wf_backup "$repo"
    w3_t+=("$SECS") w3_up+=("$UP_MB") wf_rss+=("$RSS_MB")
    log "full run $r: walferry at zstd 3 $SECS s ($UP_MB MB uploaded, RSS $RSS_MB MB)"
    rm -rf "${repo#file://}"
    # Reading the data directory directly (--pgdata); run 1's repository is kept as the
    # base of the --pgdata second backups below. No streamer: WAL comes from pg_wal.
    repo=file://$D/wf-local
    [ "$r" -gt 1 ] && repo=file://$D/wf-local-scratch
    "$WF_AGENT" init --repo "$repo" --key-file "$WF_KEY" >/dev/null
    settle
    wf_backup "$repo" --pgdata "$PGDATA"
    wl_t+=("$SECS") wl_up+=("$UP_MB") wf_rss+=("$RSS_MB")
    log "full run $r: walferry --pgdata $SECS s ($UP_MB MB uploaded, RSS $RSS_MB MB)"
    [ "$r" -gt 1 ] && rm -rf "${repo#file://}"
    settle
    pgbr_backup full
    br_t+=("$SECS") br_up+=("$UP_MB") br_rss+=("$RSS_MB")
    log "full run $r: pgBackRest $SECS s ($UP_MB MB in the repository, RSS $RSS_MB MB)"
    settle
    pgbb_backup
    bb_t+=("$SECS") bb_up+=("$UP_MB")
    log "full run $r: pg_basebackup $SECS s ($UP_MB MB)"
  done
  local wf_full br_full bb_full wf_full_up
  wf_full=$(median "${wf_t[@]}") br_full=$(median "${br_t[@]}") bb_full=$(median "${bb_t[@]}")
  wf_full_up=$(median "${wf_up[@]}")
  local wl_full wl_full_up
  wl_full=$(median "${wl_t[@]}") wl_full_up=$(median "${wl_up[@]}")

  # 2. second backups after a change (walferry's previous backup: run 1, in $WF_REPO)
  local -a inc_rows=()
  local scen change
  local n_rows
  n_rows=$rows
  sql "create extension if not exists pageinspect" >/dev/null
  local before touched
  for scen in small clustered scattered pgbench; do
    before=$(sql "select pg_current_wal_lsn()")
    case $scen in
      small)
        # Half as many rows, in the next 2.5% of the keys: about 5% of the pages (the old
        # versions' pages, and as many again at the end of the table for the new ones).
        change="UPDATE of 2.5% of rows ($MAIN_KEY $((n_rows / 20 + 1))..$((n_rows / 20 + n_rows / 40)))"
        bump_rows "$MAIN_KEY between $((n_rows / 20 + 1)) and $((n_rows / 20 + n_rows / 40))"
        ;;
      clustered)
        change="UPDATE of the first 5% of rows ($MAIN_KEY <= $((n_rows / 20)))"
        bump_rows "$MAIN_KEY <= $((n_rows / 20))"
        ;;
      scattered)
        change="UPDATE of every row on every 20th heap page"
        bump_rows "((ctid::text::point)[0])::bigint % 20 = 10"
        ;;
      pgbench)
        sql "checkpoint" >/dev/null
        if [ "$MAIN_TABLE" = pgbench_accounts ]; then
          change="pgbench -n -c 4 -j 2 -T $PGBENCH_SECONDS (TPC-B)"
          as_pg "$BIN/pgbench" -n -c 4 -j 2 -T "$PGBENCH_SECONDS" -h "$SOCK" -p "$PORT" postgres >"$D/pgbench.log" 2>&1
        else
          change="pgbench -n -c 4 -j 2 -T $PGBENCH_SECONDS, random single-row UPDATE of mixed"
          printf '\\set id random(1, %s)\nupdate mixed set qty = qty + 1 where id = :id;\n' "$n_rows" >"$D/random-update.sql"
          chown postgres "$D/random-update.sql"
          as_pg "$BIN/pgbench" -n -c 4 -j 2 -T "$PGBENCH_SECONDS" -f "$D/random-update.sql" \
            -h "$SOCK" -p "$PORT" postgres >"$D/pgbench.log" 2>&1
        fi
        change="$change, $(awk '/^tps/ { printf "%.0f tps", $3 }' "$D/pgbench.log")"
        ;;
    esac
    settle
    touched=$(pages_touched "$before")
    change="$change; touches $touched% of the pages of $MAIN_TABLE and its indexes"
    log "$scen: $touched% of the pages of $MAIN_TABLE and its indexes changed"
    settle
    wf_backup "$WF_REPO"
    local w_t=$SECS w_up=$UP_MB w_rss=$RSS_MB
    wf_rss+=("$RSS_MB")
    settle
    wf_backup "file://$D/wf-local" --pgdata "$PGDATA"
    local l_t=$SECS l_up=$UP_MB
    wf_rss+=("$RSS_MB")
    settle
    pgbr_backup incr
    local b_t=$SECS b_up=$UP_MB
    log "$scen: walferry $w_t s, $w_up MB uploaded; walferry --pgdata $l_t s, $l_up MB; pgBackRest incr $b_t s, $b_up MB"
    inc_rows+=("| $change | $w_t s | $w_up MB | $(calc "100 * $w_up / $wf_full_up" 1)% | $(calc "100 * $w_t / $wf_full" 0)% | $l_t s | $(calc "100 * $l_up / $wl_full_up" 1)% | $(calc "100 * $l_t / $wl_full" 0)% | $b_t s | $b_up MB | $(calc "$w_t / $b_t") / $(calc "$l_t / $b_t") |")
  done

  # 3. restores, interleaved
  local wr_t=() wr_rss=() pr_t=() pr_rss=() wr_f=() pr_f=() expect
  # Whatever autovacuum the changes left to do happens now, before both tools' restores
  # replay the same WAL.
  sql "vacuum" >/dev/null
  settle
  expect=$(sql "select count(*) from $MAIN_TABLE")
  # One untimed restore per tool first: on these virtual machines the first large write after
  # the backups is much slower (8 s against 3 s for the same restore), whichever tool
  # makes it, and it would land in one tool's figures only.
  wf_restore
  settle
  pgbr_restore
  settle
  # Restores alternate which tool goes first (A B, B A, ...).
  local order
  for r in $(seq 1 "$RUNS"); do
    if [ $((r % 2)) = 1 ]; then order="wf pgbr"; else order="pgbr wf"; fi
    for tool in $order; do
      if [ "$tool" = wf ]; then
        wf_restore
        wr_t+=("$SECS") wr_rss+=("$RSS_MB") wr_f+=("$FILES_SECS")
        [ "$RESTORED_ROWS" = "$expect" ] || die "walferry restore: $RESTORED_ROWS rows in $MAIN_TABLE, expected $expect"
        log "restore run $r: walferry $SECS s (RSS $RSS_MB MB), $RESTORED_ROWS rows"
      else
        pgbr_restore
        pr_t+=("$SECS") pr_rss+=("$RSS_MB") pr_f+=("$FILES_SECS")
        [ "$RESTORED_ROWS" = "$expect" ] || die "pgBackRest restore: $RESTORED_ROWS rows in $MAIN_TABLE, expected $expect"
        log "restore run $r: pgBackRest $SECS s (RSS $RSS_MB MB), $RESTORED_ROWS rows"
      fi
      settle
    done
  done
  local wr pr
  wr=$(median "${wr_t[@]}") pr=$(median "${pr_t[@]}")

  {
    echo
    echo "### $name: $data_mb MB data directory (without pg_wal); $MAIN_TABLE $table_mb MB with indexes, $rows rows; heap compresses ${ratio}x with zstd -3"
    echo
    echo "Full backup (median of $RUNS; runs: walferry ${wf_t[*]} s, walferry at zstd 3 ${w3_t[*]} s, walferry --pgdata ${wl_t[*]} s, pgBackRest ${br_t[*]} s, pg_basebackup ${bb_t[*]} s)"
    echo
    echo "| tool | wall time | stored | walferry / tool | walferry at zstd 3 / tool |"
    echo "|---|---|---|---|---|"
    local w3_full
    w3_full=$(median "${w3_t[@]}")
    echo "| walferry (default zstd level $WF_LEVEL) | $wf_full s | $wf_full_up MB | 1.00 | $(calc "$w3_full / $wf_full") |"
    echo "| walferry, repository at zstd 3 (the peers' level) | $w3_full s | $(median "${w3_up[@]}") MB | $(calc "$wf_full / $w3_full") | 1.00 |"
    echo "| walferry --pgdata (reads the data directory; default level) | $wl_full s | $wl_full_up MB | $(calc "$wf_full / $wl_full") | $(calc "$w3_full / $wl_full") |"
    echo "| pgBackRest 2.45 (zst 3, process-max 2, aes-256-cbc) | $br_full s | $(median "${br_up[@]}") MB | $(calc "$wf_full / $br_full") | $(calc "$w3_full / $br_full") |"
    echo "| pg_basebackup -Ft server-zstd:level=3,workers=2 | $bb_full s | $(median "${bb_up[@]}") MB | $(calc "$wf_full / $bb_full") | $(calc "$w3_full / $bb_full") |"
    echo
    echo "walferry --pgdata / pgBackRest: $(calc "$wl_full / $br_full"); walferry --pgdata / pg_basebackup: $(calc "$wl_full / $bb_full")"
    echo
    echo "Second backup after a change (walferry: vs its full backup; pgBackRest: --type=incr)"
    echo
    echo "| change | walferry time | walferry uploaded | uploaded / full | time / full | --pgdata time | --pgdata uploaded / its full | --pgdata time / its full | pgBackRest incr time | pgBackRest incr stored | walferry / pgBackRest time (BASE_BACKUP / --pgdata) |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|"
    printf '%s\n' "${inc_rows[@]}"
    echo
    echo "Restore to a running, promoted cluster (median of $RUNS; runs: walferry ${wr_t[*]} s, pgBackRest ${pr_t[*]} s)"
    echo
    echo "| tool | wall time | of which writing files | rest: plan, start, recovery, promotion | walferry / tool |"
    echo "|---|---|---|---|---|"
    local wf_files pr_files
    wf_files=$(median "${wr_f[@]}") pr_files=$(median "${pr_f[@]}")
    echo "| walferry-restore --to latest --start | $wr s | $wf_files s | $(calc "$wr - $wf_files") s | 1.00 |"
    echo "| pgbackrest restore + pg_ctl start + end of recovery | $pr s | $pr_files s | $(calc "$pr - $pr_files") s | $(calc "$wr / $pr") |"
    echo
    echo "Peak RSS: walferry backup $(max "${wf_rss[@]}") MB (max over all its backups), walferry restore $(max "${wr_rss[@]}") MB; for reference pgBackRest backup $(max "${br_rss[@]}") MB, restore $(max "${pr_rss[@]}") MB (largest single process)."
    echo
    echo "walferry's own summaries:"
    echo '```'
    cat "$D/wf-summaries.log"
    echo '```'
  } >>"$RESULTS"
  teardown_dataset
}

log "walferry vs pgBackRest $PGBR_VERSION vs pg_basebackup (PostgreSQL $PG_VERSION); $(nproc) CPUs; quick=$QUICK runs=$RUNS drop_caches=$DROP_CACHES; work dir $WORK"
{
  echo "## walferry vs pgBackRest $PGBR_VERSION vs pg_basebackup — $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "PostgreSQL $PG_VERSION, $(nproc) CPUs, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM; mode: $([ "$QUICK" = 1 ] && echo "--quick (scale $SCALE)" || echo "full (scale $SCALE)"); $RUNS runs per measurement, interleaved; caches $([ "$DROP_CACHES" = 1 ] && echo dropped before each || echo warm); load average at start: $(cut -d' ' -f1-3 /proc/loadavg)."
} >>"$RESULTS"
IFS=, read -r -a sets <<<"$DATASETS"
for s in "${sets[@]}"; do
  case $s in pgbench | mixed) run_dataset "$s" ;; *) die "unknown dataset $s (pgbench, mixed)" ;; esac
done
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$RESULTS"
echo
cat "$RESULTS"
