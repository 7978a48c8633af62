#!/usr/bin/env bash
# Destination benchmark: sluice (the `fast` profile) pinned to core 1; the load generator and the webhook
# receiver (tools/loadgen's sluice-receiver) on core 0; loopback.
#
#   benches/destinations.sh [SECONDS]
#   SLUICE_BENCH_COST=REPEATS benches/destinations.sh [SECONDS]   # only 3., REPEATS times
#   SLUICE_BENCH_RATES="750 1000" benches/destinations.sh [SECONDS] # one webhook at these
#                                                                   # requests/s (100 messages each)
#
# 1. latency: one webhook destination (batch_size 100) at 25,000 messages/s offered (half the
#    50 k/s target): the receiver prints acceptance-to-arrival percentiles.
# 2. throughput: the same destination at 50,000 messages/s offered, without and with the 50
#    segments of benches/fifty-segments (the whole server), then at full load (closed loop):
#    messages/s acknowledged vs received, and the delivery delay.
# 3. ten destinations, one dead: ingestion at full load with no destination, then with nine
#    healthy ones and a dead one (connection refused); the ratio is the cost.
source "$(dirname "$0")/common.sh"
seconds="${1:-30}"
trap 'pkill -f "sluice-receiver --listen 127.0.0.1:$receiver_port" || true; bench_cleanup' EXIT
port=18088
receiver_port=19099

segments="$PWD/benches/fifty-segments"
config() { # config N_HEALTHY N_DEAD [segments]
  rm -rf "$work/data" "$work/destinations"
  mkdir -p "$work/destinations"
  write_config <<TOML
[destinations]
dir = "destinations"
TOML
  if [ "${3:-}" = segments ]; then
    printf '[segments]\ndir = "%s"\n' "$segments" >> "$work/sluice.toml"
  fi
  for i in $(seq 1 "$1"); do
    printf 'type = "webhook"\nurl = "http://127.0.0.1:%s/hook"\n[delivery]\nbatch_size = 100\nconcurrency = 4\n' \
      "$receiver_port" > "$work/destinations/healthy$i.toml"
  done
  for i in $(seq 1 "$2"); do
    printf 'type = "webhook"\nurl = "http://127.0.0.1:9/gone"\n[delivery]\nbatch_size = 100\n' \
      > "$work/destinations/dead$i.toml"
  done
}

run() { # NAME HEALTHY DEAD SEGMENTS(segments|-) -- loadgen args
  local name="$1" healthy="$2" dead="$3" with="$4"; shift 4
  config "$healthy" "$dead" "$with"
  if [ "$healthy" -gt 0 ]; then
    taskset -c 0 "$bin/sluice-receiver" --listen "127.0.0.1:$receiver_port" \
      --warmup 5 --duration "$seconds" > "$work/receiver.out" &
  fi
  start_sluice
  echo "--- $name"
  taskset -c 0 "$bin/sluice-loadgen" --addr "127.0.0.1:$port" --warmup 5 --duration "$seconds" "$@"
  kill -TERM "$pid"; wait "$pid" || true
  if [ "$healthy" -gt 0 ]; then wait; cat "$work/receiver.out"; fi
}

if [ -n "${SLUICE_BENCH_RATES:-}" ]; then
  for rate in $SLUICE_BENCH_RATES; do
    run "1 webhook, $((rate * 100)) msg/s offered" 1 0 - --mode batch --batch 100 --connections 16 --rate "$rate"
  done
  exit 0
fi

if [ -n "${SLUICE_BENCH_COST:-}" ]; then
  for i in $(seq 1 "$SLUICE_BENCH_COST"); do
    run "no destinations, ingestion at full load #$i" 0 0 - --mode batch --batch 100 --connections 32
    run "ten destinations (one dead), ingestion at full load #$i" 9 1 - --mode batch --batch 100 --connections 32
  done
  exit 0
fi

run "latency: 1 webhook, 25k msg/s offered" 1 0 - --mode batch --batch 100 --connections 16 --rate 250
run "throughput: 1 webhook, 50k msg/s offered" 1 0 - --mode batch --batch 100 --connections 16 --rate 500
run "throughput: 1 webhook, 50 segments, 50k msg/s offered" 1 0 segments --mode batch --batch 100 --connections 16 --rate 500 --events web
run "throughput: 1 webhook, ingestion at full load" 1 0 - --mode batch --batch 100 --connections 32
run "no destinations, ingestion at full load" 0 0 - --mode batch --batch 100 --connections 32
run "ten destinations (one dead), ingestion at full load" 9 1 - --mode batch --batch 100 --connections 32
