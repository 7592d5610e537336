#!/usr/bin/env bash
# Usage (root, after `cargo build --release`): bash benches/daemon.sh
# Daemon RSS/CPU idle and under pgbench, and /metrics scrape latency.
set -euo pipefail
B=/usr/lib/postgresql/15/bin; A=/work/main/target/release/walferry-agent
W=$(mktemp -d /tmp/md.XXXX); chown postgres $W; mkdir $W/sock; chown postgres $W/sock
runuser -u postgres -- $B/initdb -D $W/pg -k >/dev/null 2>&1
printf "port = 54391\nunix_socket_directories = '$W/sock'\nlisten_addresses = ''\n" >> $W/pg/postgresql.conf
runuser -u postgres -- $B/pg_ctl -D $W/pg -l $W/pg.log -w start >/dev/null
$A init --repo file://$W/repo --no-encryption >/dev/null
$A run --repo file://$W/repo --pg "host=$W/sock port=54391 user=postgres" --listen 127.0.0.1:19187 --rpo 1s > $W/agent.log 2>&1 &
PID=$!
trap "kill $PID 2>/dev/null; runuser -u postgres -- $B/pg_ctl -D $W/pg -m immediate stop >/dev/null 2>&1; rm -rf $W" EXIT
sleep 3
runuser -u postgres -- $B/pgbench -h $W/sock -p 54391 -i -s 20 -q postgres >/dev/null 2>&1
sleep 3
ticks() { awk '{print $14+$15}' /proc/$PID/stat; }
rss() { awk '/VmRSS/{print $2}' /proc/$PID/status; }
HZ=$(getconf CLK_TCK)
t0=$(ticks); sleep 20; t1=$(ticks)
echo "idle: RSS $(rss) KiB, CPU $(awk -v a=$t0 -v b=$t1 -v hz=$HZ 'BEGIN{printf "%.2f%%", (b-a)/hz/20*100}')"
t0=$(ticks); maxrss=0
runuser -u postgres -- $B/pgbench -h $W/sock -p 54391 -c 8 -j 2 -T 30 -n postgres 2>/dev/null | grep -E "^tps" &
BP=$!
for i in $(seq 1 30); do r=$(rss); [ $r -gt $maxrss ] && maxrss=$r; sleep 1; done
wait $BP
t1=$(ticks)
echo "pgbench -c 8 -T 30: peak RSS $maxrss KiB, CPU $(awk -v a=$t0 -v b=$t1 -v hz=$HZ 'BEGIN{printf "%.1f%%", (b-a)/hz/30*100}') of one core"
curl -s 127.0.0.1:19187/metrics | grep -E "^walferry_(upload_bytes_total|lag_bytes|rpo_seconds|durable_lsn) "
for i in $(seq 1 50); do curl -s -o /dev/null -w "%{time_total}\n" 127.0.0.1:19187/metrics; done | sort -n | awk '{a[NR]=$1} END {printf "scrape latency over %d requests: p50 %.2f ms, p99 %.2f ms, max %.2f ms\n", NR, a[int(NR*0.5)]*1000, a[int(NR*0.99)]*1000, a[NR]*1000}'
