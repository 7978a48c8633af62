#!/usr/bin/env bash
# The whole-server benchmark protocol: sluice (the `fast` profile) pinned to core 1, the load generator
# pinned to core 0, loopback, ~420-byte tracks with unique messageIds, a 200 meaning fsynced.
#
#   benches/load.sh [SECONDS] [REPEATS]
#   SLUICE_BENCH_PLAN=1 benches/load.sh [SECONDS] [REPEATS]
#   SLUICE_BENCH_BASELINE=/path/to/old/fast benches/load.sh [SECONDS] [REPEATS]
#
# Runs, REPEATS times each on a fresh data folder: /v1/batch (100 per request) and /v1/track at
# full load (closed loop), then both at half of the contract's targets (open loop) for latency.
# With SLUICE_BENCH_PLAN=1 it instead alternates /v1/batch at full load without and with the
# shipped tracking plan (`schemas/`, violations blocked), so the two can be compared as a ratio
# measured in one run; the loadgen's "Order Completed" satisfies that plan.
source "$(dirname "$0")/common.sh"
seconds="${1:-60}"
loadgen="$bin/sluice-loadgen"   # the same load generator whichever server build is measured
repeats="${2:-3}"
port=18088
config() {
  write_config <<TOML
[log]
dir = "data/log"
TOML
  if [ "${1:-}" = plan ]; then
    printf '[schemas]\ndir = "%s/schemas"\nviolations = "block"\n' "$PWD" >> "$work/sluice.toml"
  fi
}
config

run() {
  local name="$1"; shift
  rm -rf "$work/data"
  start_sluice
  echo "--- $name"
  taskset -c 0 "$loadgen" --addr "127.0.0.1:$port" --duration "$seconds" --pid "$pid" "$@"
  curl -fsS "http://127.0.0.1:$port/metrics" | grep '^sluice_schema_checks_total' || true
  kill -TERM "$pid"; wait "$pid"
}

# SLUICE_BENCH_BASELINE=<dir holding an older build's sluice>: alternate /v1/batch at full load
# between that build and this one, REPEATS times each, so the two compare as a ratio measured in
# one run (the machine's noise falls on both).
if [ -n "${SLUICE_BENCH_BASELINE:-}" ]; then
  current="$bin"
  for i in $(seq 1 "$repeats"); do
    bin="$SLUICE_BENCH_BASELINE"
    run "batch full load, baseline #$i" --mode batch --batch 100 --connections 32
    bin="$current"
    run "batch full load, this build #$i" --mode batch --batch 100 --connections 32
  done
  exit 0
fi

if [ -n "${SLUICE_BENCH_PLAN:-}" ]; then
  for i in $(seq 1 "$repeats"); do
    config
    run "batch full load, no plan #$i" --mode batch --batch 100 --connections 32
    config plan
    run "batch full load, shipped plan enforced #$i" --mode batch --batch 100 --connections 32
  done
  exit 0
fi

for i in $(seq 1 "$repeats"); do
  run "batch full load #$i" --mode batch --batch 100 --connections 32
  run "track full load #$i" --mode track --connections 64
  run "batch half of 120k msg/s #$i" --mode batch --batch 100 --connections 32 --rate 600
  run "track half of 20k req/s #$i" --mode track --connections 64 --rate 10000
done
