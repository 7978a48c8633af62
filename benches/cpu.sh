#!/usr/bin/env bash
# Server CPU per acknowledged message under /v1/batch at full load (100 per request, 32
# connections, closed loop): the server's user+system ticks over 15 s after 5 s of warm-up, over
# the messages it accepted meanwhile. Steadier than a throughput figure on a machine whose speed
# drifts, since it does not depend on how much of the core the server got. With PERF=1 it also
# records a `perf` profile of those 15 s into $work/perf.data and prints its top symbols.
#
#   benches/cpu.sh [BUILD_DIR...]     each a folder holding a `sluice` build (default: this build)
#
# The same load generator (this build's) drives every build; give several folders to alternate
# builds in one run.
source "$(dirname "$0")/common.sh"
port=18099
loadgen="$bin/sluice-loadgen"
write_config <<TOML
[log]
dir = "data/log"
TOML

ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
accepted() { metric | awk '/^sluice_ingest_messages_total/ && /accepted/ {s += $2} END {print s}'; }

for build in "${@:-$bin}"; do
  bin="$build"
  rm -rf "$work/data"
  start_sluice
  taskset -c 0 "$loadgen" --addr "127.0.0.1:$port" --duration 25 --pid "$pid" \
    --mode batch --batch 100 --connections 32 > "$work/loadgen.txt" &
  load=$!
  sleep 5
  t0=$(ticks); m0=$(accepted)
  if [ -n "${PERF:-}" ]; then
    perf record -F 999 -g -p "$pid" -o "$work/perf.data" -- sleep 15 >/dev/null 2>&1
  else
    sleep 15
  fi
  t1=$(ticks); m1=$(accepted)
  wait "$load"
  hz=$(getconf CLK_TCK)
  echo "$build: $(( (m1 - m0) / 15 )) msg/s, $(echo "scale=3; ($t1 - $t0) * 1000000 / $hz / ($m1 - $m0)" | bc) µs CPU per message"
  if [ -n "${PERF:-}" ]; then
    perf report -i "$work/perf.data" --no-children --sort symbol --stdio 2>/dev/null \
      | grep -E '^ +[0-9.]+%' | head -25
  fi
  kill -TERM "$pid"; wait "$pid"
done
