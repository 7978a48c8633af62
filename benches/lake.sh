#!/usr/bin/env bash
# The lake benchmarks: ingestion with the lake writer running, the lake's size per message, and
# `SELECT event, count(*) FROM events GROUP BY event` over 10 million messages in Sluice and in
# DuckDB on the same files, side by side.
#
#   benches/lake.sh [SECONDS]
#   SLUICE_LAKE_RATE=60000 SLUICE_BENCH_PHASES=1 benches/lake.sh   # ingestion at another rate
#   SLUICE_BENCH_PHASES="2" SLUICE_BENCH_QUERY_BUILDS="DIR1 DIR2" benches/lake.sh
#                           # only the GROUP BY, timed with each build in turn (folders holding a
#                           # `sluice` build; default: this build)
#
# Protocol as in benches/load.sh: sluice (the `fast` profile) on core 1, the load generator on core 0,
# varied web events (`--events web`, ~560 bytes enriched). DuckDB comes from PyPI into
# $SLUICE_BENCH_VENV (default ~/.cache/sluice-bench-venv).
source "$(dirname "$0")/common.sh"
seconds="${1:-60}"
venv="${SLUICE_BENCH_VENV:-$HOME/.cache/sluice-bench-venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check duckdb==2.0.0
port=18089
write_config <<TOML
[log]
dir = "data/log"
[storage]
url = "file://./data/lake"
flush_interval = "10s"
TOML

lag() { consumer_lag lake; }

phases="${SLUICE_BENCH_PHASES:-1 2}"
phase() { [[ " $phases " == *" $1 "* ]]; }

if phase 1; then
rate="${SLUICE_LAKE_RATE:-80000}"
echo "--- $rate messages/s (batches of 100, open loop) for $seconds s, lake writer running"
rm -rf "$work/data"
start_sluice
( for _ in $(seq 1 $((seconds / 5 + 1))); do sleep 5; printf '%s ' "$(lag)"; done ) > "$work/lag" &
sampler=$!
taskset -c 0 "$bin/sluice-loadgen" --addr "127.0.0.1:$port" --events web --mode batch --batch 100 \
  --connections 32 --rate "$((rate / 100))" --duration "$seconds" --pid "$pid"
wait "$sampler" || true
echo "lake lag behind the log, records, every 5 s: $(cat "$work/lag")"
kill -TERM "$pid"; wait "$pid"
rows="$("$bin/sluice" --config "$work/sluice.toml" query --format csv "SELECT count(*) AS n FROM events" | tail -1)"
bytes="$(find "$work/data/lake/events" -name '*.parquet' -printf '%s\n' | awk '{s += $1} END {print s}')"
echo "lake: $rows events in $bytes bytes of Parquet: $(awk -v b="$bytes" -v r="$rows" 'BEGIN {printf "%.1f", b / r}') bytes per message"
fi

if phase 2; then

echo "--- filling the lake to 10,000,000 messages (closed loop)"
start_sluice
while :; do
  have="$("$bin/sluice" --config "$work/sluice.toml" query --format csv "SELECT count(*) FROM events" | tail -1)"
  [ "$have" -ge 10000000 ] && break
  taskset -c 0 "$bin/sluice-loadgen" --addr "127.0.0.1:$port" --events web --mode batch --batch 100 \
    --connections 32 --duration 20 --warmup 0 > /dev/null
  sleep 11
done
kill -TERM "$pid"; wait "$pid"
files="$(find "$work/data/lake/events" -name '*.parquet' | wc -l)"
echo "lake: $have events in $files files"

sql="SELECT event, count(*) AS n FROM events GROUP BY event ORDER BY event"
glob="$work/data/lake/events/*/*.parquet"
echo "--- $sql: five runs each, alternating, wall time of the whole command"
for i in 1 2 3 4 5; do
  for build in ${SLUICE_BENCH_QUERY_BUILDS:-$bin}; do
    s=$(date +%s.%N); taskset -c 1 "$build/sluice" --config "$work/sluice.toml" query --format csv "$sql" > /dev/null; e=$(date +%s.%N)
    echo "sluice query  $(awk -v s="$s" -v e="$e" 'BEGIN {printf "%.3f", e - s}') s  ($build)"
  done
  s=$(date +%s.%N)
  taskset -c 1 "$venv/bin/python" -c "import duckdb; duckdb.sql(\"SELECT event, count(*) AS n FROM read_parquet('$glob', hive_partitioning = true) GROUP BY event ORDER BY event\").fetchall()"
  e=$(date +%s.%N)
  echo "duckdb        $(awk -v s="$s" -v e="$e" 'BEGIN {printf "%.3f", e - s}') s"
done
fi
