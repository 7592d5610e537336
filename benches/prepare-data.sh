#!/usr/bin/env bash
# Builds the datasets the criterion benches read, from a real, throwaway PostgreSQL cluster:
#
#   heap-pgbench.bin  main fork of pgbench_accounts after `pgbench -i` (compresses ~20x)
#   heap-mixed.bin    main fork of a table of random-ish rows (md5 text, numerics,
#                     timestamps, enums, free text) tuned to compress ~3x with zstd -3
#   wal.bin           consecutive WAL segments written by a short TPC-B run started
#                     right after a CHECKPOINT (so it has full-page images, as real WAL does)
#
# Usage: bash benches/prepare-data.sh            (writes target/bench-data/)
# Env:   WALFERRY_BENCH_DATA   output directory (default: <repo>/target/bench-data)
#        PG_BINDIR             server binaries (default: pg_config --bindir, else
#                              the newest /usr/lib/postgresql/*/bin)
#        PGBENCH_SCALE (7), MIXED_ROWS (500000), WAL_SEGMENTS (6), TPCB_SECONDS (15)
#
# As root, every Postgres binary runs as the `postgres` user (Postgres refuses root).
# The cluster lives in a temp dir, listens only on a private unix socket, and is
# stopped and removed on exit, whatever happens.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
out="${WALFERRY_BENCH_DATA:-$repo/target/bench-data}"
scale="${PGBENCH_SCALE:-7}"
mixed_rows="${MIXED_ROWS:-500000}"
wal_segments="${WAL_SEGMENTS:-6}"
tpcb_seconds="${TPCB_SECONDS:-15}"
max_bytes=$((128 << 20))

find_bindir() {
    if [[ -n "${PG_BINDIR:-}" ]]; then echo "$PG_BINDIR"; return; fi
    if [[ -x /usr/lib/postgresql/15/bin/postgres ]]; then echo /usr/lib/postgresql/15/bin; return; fi
    if command -v pg_config >/dev/null && [[ -x "$(pg_config --bindir)/postgres" ]]; then
        pg_config --bindir; return
    fi
    local d
    d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)"
    [[ -n "$d" ]] || { echo "prepare-data: no PostgreSQL server binaries found (set PG_BINDIR)" >&2; exit 1; }
    echo "$d"
}
bindir="$(find_bindir)"

if [[ "$(id -u)" == 0 ]]; then
    id postgres >/dev/null 2>&1 || { echo "prepare-data: running as root needs a 'postgres' user" >&2; exit 1; }
    as_pg() { runuser -u postgres -- "$@"; }
    pg_owner=postgres
else
    as_pg() { "$@"; }
    pg_owner="$(id -un)"
fi

work="$(mktemp -d /tmp/walferry-bench-pg.XXXXXX)"
pgdata="$work/data"
sock="$work/sock"
mkdir -p "$sock"
chown -R "$pg_owner" "$work"
chmod 700 "$work"
# Any port works: the server listens on no TCP address, only on the private socket dir.
port=$((20000 + RANDOM % 20000))

cleanup() {
    if [[ -f "$pgdata/postmaster.pid" ]]; then
        as_pg "$bindir/pg_ctl" -D "$pgdata" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

psql() { as_pg "$bindir/psql" -X -q -v ON_ERROR_STOP=1 -h "$sock" -p "$port" -d postgres "$@"; }
sql() { psql -At -c "$1"; }

echo "prepare-data: initdb in $pgdata (PostgreSQL $("$bindir/postgres" --version | awk '{print $3}'))"
as_pg "$bindir/initdb" -D "$pgdata" -U postgres --auth=trust --no-instructions >/dev/null
as_pg "$bindir/pg_ctl" -D "$pgdata" -w -l "$work/server.log" \
    -o "-c listen_addresses='' -c unix_socket_directories='$sock' -p $port \
        -c max_wal_size=8GB -c checkpoint_timeout=1h -c shared_buffers=256MB \
        -c synchronous_commit=off" \
    start >/dev/null

relfile() { echo "$pgdata/$(sql "select pg_relation_filepath('$1')")"; }

copy_capped() { # src dst: at most 128 MiB, in whole 8 KiB pages
    head -c "$max_bytes" "$1" >"$2"
    echo "prepare-data: $(basename "$2"): $(stat -c %s "$2") bytes"
}

mkdir -p "$out"

echo "prepare-data: pgbench -i -s $scale"
as_pg "$bindir/pgbench" -i -q -s "$scale" -h "$sock" -p "$port" postgres >/dev/null 2>&1

echo "prepare-data: mixed table, $mixed_rows rows"
psql <<SQL
CREATE TABLE mixed AS
SELECT g::bigint                                                   AS id,
       substr(md5(g::text), 1, 16)                                 AS ref,
       round((random() * 100000)::numeric, 2)                      AS amount,
       (random() * 1000)::int                                      AS qty,
       timestamptz '2024-01-01' + random() * interval '400 days'   AS created_at,
       (array['new','paid','shipped','delivered','cancelled','refunded'])[1 + (random() * 5)::int] AS status,
       'customer-' || (random() * 50000)::int || '@example.com'    AS email,
       (array['EUR','USD','GBP','CHF'])[1 + (random() * 3)::int]   AS currency,
       (array['web','mobile','store','phone'])[1 + (random() * 3)::int] AS channel,
       (SELECT string_agg(w[1 + (random() * 23)::int + 0 * i], ' ') -- "0 * i", "0 * g": per row
          FROM generate_series(1, 5 + (random() * 10)::int + 0 * g) AS i) AS note,
       (random() < 0.3)                                            AS flagged
FROM generate_series(1, $mixed_rows) AS g,
     LATERAL (SELECT array['order','delayed','customer','asked','for','a','refund','gift','wrap',
                           'express','shipping','address','changed','warehouse','north','south',
                           'backorder','invoice','sent','paid','by','card','voucher','note'] AS w) AS words;
VACUUM (FREEZE, ANALYZE) mixed;
CHECKPOINT;
SQL

copy_capped "$(relfile pgbench_accounts)" "$out/heap-pgbench.bin"
copy_capped "$(relfile mixed)" "$out/heap-mixed.bin"

echo "prepare-data: ${tpcb_seconds}s of TPC-B for WAL"
start_wal="$(sql "select pg_walfile_name(pg_current_wal_lsn())")"
as_pg "$bindir/pgbench" -n -c 4 -j 2 -T "$tpcb_seconds" -h "$sock" -p "$port" postgres >/dev/null 2>&1
end_wal="$(sql "select pg_walfile_name(pg_switch_wal())")"
# Whole segments written after the checkpoint: strictly after the checkpoint's segment
# (so the first holds the full-page images that follow a checkpoint) and strictly before
# the one the switch cut short. Names beyond that are recycled, stale files.
mapfile -t segs < <(ls "$pgdata/pg_wal" | grep -E '^[0-9A-F]{24}$' | sort |
    awk -v s="$start_wal" -v e="$end_wal" '$0 > s && $0 < e')
((${#segs[@]} > 0)) || { echo "prepare-data: no WAL segments found after $start_wal" >&2; exit 1; }
: >"$out/wal.bin.tmp"
n=0
for s in "${segs[@]}"; do
    ((n < wal_segments)) || break
    cat "$pgdata/pg_wal/$s" >>"$out/wal.bin.tmp"
    n=$((n + 1))
done
mv "$out/wal.bin.tmp" "$out/wal.bin"
echo "prepare-data: wal.bin: $n segments from ${segs[0]}, $(stat -c %s "$out/wal.bin") bytes"

if command -v zstd >/dev/null; then
    for f in heap-pgbench heap-mixed wal; do
        c="$(zstd -3 -c -q "$out/$f.bin" | wc -c)"
        awk -v f="$f" -v a="$(stat -c %s "$out/$f.bin")" -v c="$c" \
            'BEGIN { printf "prepare-data: %-13s zstd -3 ratio %.2fx\n", f, a / c }'
    done
fi
echo "prepare-data: done; data in $out"
