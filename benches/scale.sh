#!/usr/bin/env bash
# One node at scale: a profile store pre-filled with 10,000,000 profiles (tools/profilegen, made
# once and kept in $SLUICE_SCALE_STORE, copied for each run; made again once it is 3 hours old,
# as its histories and timers are relative to when it was made), of which the 1,000,000 the load
# sends as are daily-active (last seen within the last day), the 50 segments of
# benches/fifty-segments (windowed ones included), the lake on file://, and one webhook
# destination receiving every message (tools/loadgen's sluice-receiver).
#
#   benches/scale.sh [SECONDS]          # default 120
#
# 1. Zipf traffic (exponent 1) from 1,000,000 of the stored users at 50,000 messages/s.
# 2. Uniform traffic over 1,000,000 of the stored users at 25,000 messages/s.
# 3. (SLUICE_BENCH_PHASES=3 only) Zipf traffic for SECONDS, SIGKILL, a restart with the load going
#    on for SECONDS more: how soon it serves again, every consumer's lag, how soon all caught up
#    once the load stopped, and the segment changes in the lake against their distinct messageIds.
# Each run: the acknowledged rate and latency (the load generator), the messages the profile
# stage applied in each 5 s against those offered (equal = it keeps up), its lag, the server's RSS
# every 5 s, the segment changes' delays (from their cause to the change in the log; at half the
# rates, the target's measure), the profile cache's tiers, and the profile store's size. Also the
# profile store's saves (count, seconds in all) and how long the stage waited for them, every
# log consumer's lag when the load ends, and the server's CPU thread by thread over the middle
# third of the load (where one core's time goes), and the segment changes per message applied.
# Knobs: SLUICE_SCALE_ZIPF_RATE, SLUICE_SCALE_UNIFORM_RATE (messages/s); SLUICE_SCALE_PROFILES
# (10000000) sizes the store; SLUICE_SCALE_STORE_CACHE sets profiles.store_cache (e.g. 512MiB),
# SLUICE_SCALE_CACHE_MEMORY profiles.cache_memory; SLUICE_BENCH_SAVER_NICE renices the profile
# saver (nice 10 by default); SLUICE_BENCH_PHASES="1" runs one phase.
# Protocol as in benches/load.sh: sluice (the `fast` profile) on core 1, the load generator on core 0.
source "$(dirname "$0")/common.sh"
seconds="${1:-120}"
port=18092
receiver_port=19092
profiles="${SLUICE_SCALE_PROFILES:-10000000}"
active=$((profiles < 1000000 ? profiles : 1000000))
store="${SLUICE_SCALE_STORE:-$HOME/.cache/sluice/scale-store-$profiles-active-$active}"
trap 'pkill -f "sluice-receiver --listen 127.0.0.1:$receiver_port" || true; bench_cleanup' EXIT

if [ ! -d "$store/store" ] || [ -n "$(find "$store" -maxdepth 0 -mmin +180)" ]; then
  echo "--- making the store: $profiles profiles in $store (once; it is kept)"
  rm -rf "$store"
  taskset -c 1 "$bin/sluice-profilegen" --segments benches/fifty-segments --dir "$store" \
    --profiles "$profiles" --daily-active "$active"
fi

cp -r benches/fifty-segments "$work/segments"
mkdir -p "$work/destinations"
printf 'type = "webhook"\nurl = "http://127.0.0.1:%s/hook"\n[delivery]\nbatch_size = 100\nconcurrency = 4\n' \
  "$receiver_port" > "$work/destinations/hook.toml"
write_config <<TOML
[log]
dir = "data/log"
[storage]
url = "file://./data/lake"
flush_interval = "10s"
[segments]
dir = "segments"
[profiles]
dir = "data/profiles"
${SLUICE_SCALE_STORE_CACHE:+store_cache = \"$SLUICE_SCALE_STORE_CACHE\"}
${SLUICE_SCALE_CACHE_MEMORY:+cache_memory = \"$SLUICE_SCALE_CACHE_MEMORY\"}
[destinations]
dir = "destinations"
TOML

applied() { metric | awk '/^sluice_profile_messages_total / {print $2}'; }
rss_mb() { awk '/^VmRSS:/ {print int($2 / 1024)}' "/proc/$pid/status"; }

# A fresh copy of the store as the server's, and the webhook's receiver started.
fresh_start() {
  rm -rf "$work/data" "$work"/{lag,applied,rss}
  mkdir -p "$work/data"
  cp -r "$store" "$work/data/profiles"
  # On the disk before the clock starts: otherwise the store's first save commits (fsyncs) the
  # whole copy.
  sync -f "$work/data/profiles"
  taskset -c 0 "$bin/sluice-receiver" --listen "127.0.0.1:$receiver_port" \
    --warmup 0 --duration "$1" > "$work/receiver.out" &
}
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
load() { # RATE SECONDS -- loadgen user options
  local rate="$1" duration="$2"; shift 2
  taskset -c 0 "$bin/sluice-loadgen" --addr "127.0.0.1:$port" --events web --mode batch --batch 100 \
    --connections 32 --rate "$((rate / 100))" --duration "$duration" --warmup 0 --pid "$pid" \
    --users "$active" --user-space "$profiles" "$@"
}

# Every consumer's lag, as "name=records ...".
lags() { metric | sed -n 's/^sluice_log_consumer_lag_records{consumer="\([^"]*\)"} \(.*\)/\1=\2/p' | tr '\n' ' '; }

run() { # NAME RATE -- loadgen user options
  local name="$1" rate="$2"; shift 2
  echo "--- $name: $rate messages/s for $seconds s over $profiles stored profiles"
  fresh_start $((seconds + 30))
  local started_at; started_at="$(date +%s%N)"
  start_sluice
  if [ -n "${SLUICE_BENCH_SAVER_NICE:-}" ]; then
    renice -n "$SLUICE_BENCH_SAVER_NICE" -p "$(thread_id sluice-saver)" > /dev/null
  fi
  echo "serving $(ms_since "$started_at") ms after start"
  local before; before="$(applied)"
  ( for _ in $(seq 1 $((seconds / 5))); do sleep 5
      printf '%s ' "$(consumer_lag profiles)" >> "$work/lag"
      printf '%s ' "$(applied)" >> "$work/applied"
      printf '%s ' "$(rss_mb)" >> "$work/rss"
    done ) &
  local sampler=$!
  # Over the middle third of the load, when the first touches of the run have thinned out.
  ( sleep $((seconds / 3)); thread_cpu $((seconds / 3)) > "$work/cpu" ) &
  local cpu=$!
  load "$rate" "$seconds" "$@"
  wait "$sampler" "$cpu" || true
  echo "every consumer's lag at the end of the load: $(lags)"
  echo "server CPU by thread, % of the core, over the middle third: $(cat "$work/cpu")"
  echo "messages the stage applied in each 5 s ($((rate * 5)) offered; equal = it keeps up): $(
    awk -v b="$before" '{for (i = 1; i <= NF; i++) {printf "%d ", $i - b; b = $i}}' "$work/applied")"
  echo "profile stage lag, records, every 5 s: $(cat "$work/lag")"
  echo "server RSS, MB, every 5 s: $(cat "$work/rss")"
  delays Message
  delays Timer
  metric | grep -E '^sluice_(profiles|profile_messages_total|segment_timer_wakeups_total) |^sluice_profile_cache_' || true
  metric | grep -E '^sluice_profile_save(_pause)?_seconds_(sum|count)' || true
  metric | awk '/^sluice_segment_changes_total/ {c += $2} /^sluice_profile_messages_total / {m = $2}
    END {if (m) printf "segment changes: %d, %.2f per message applied\n", c, c / m}'
  kill -TERM "$pid"; wait "$pid" || true
  pkill -f "sluice-receiver --listen 127.0.0.1:$receiver_port" || true
  wait || true
  du -sh "$work/data/profiles" "$work/data/lake" "$work/data/log"
}

restart() { # RATE
  local rate="$1"
  echo "--- 3. SIGKILL after $seconds s of Zipf traffic at $rate messages/s, restart, $seconds s more"
  fresh_start $((3 * seconds + 600))
  start_sluice
  load "$rate" "$((seconds + 5))" --zipf 1 > "$work/load-before.out" 2>&1 &
  local loader=$!
  sleep "$seconds"
  kill -KILL "$pid"
  local killed_at; killed_at="$(date +%s%N)"
  wait "$pid" 2>/dev/null || true
  start_sluice
  echo "serving again $(ms_since "$killed_at") ms after the SIGKILL"
  wait "$loader" || true
  echo "lag just after the restart: $(lags)"
  load "$rate" "$seconds" --zipf 1 | grep -E 'acknowledged|p99' || true
  local stopped_at; stopped_at="$(date +%s%N)"
  echo "lag when the load stopped ($(ms_since "$killed_at") ms after the SIGKILL): $(lags)"
  # Caught up: under 1,000 records behind (timers and clock records keep a few coming).
  local waited=0
  while lags | tr ' ' '\n' | awk -F= 'NF == 2 && $2 >= 1000 {behind = 1} END {exit !behind}' \
    && [ "$waited" -lt 600 ]; do
    sleep 1; waited=$((waited + 1))
  done
  echo "every consumer under 1,000 records behind $(ms_since "$stopped_at") ms after the load stopped: $(lags)"
  # Every change the stage emitted is in the lake once: a change emitted twice would show as one
  # messageId twice (the dedup would drop a second append, so this checks the whole path).
  sleep 12
  "$bin/sluice" --config "$work/sluice.toml" query --format csv "SELECT count(*) AS changes,
    count(DISTINCT message_id) AS distinct_ids FROM events WHERE source = 'sluice'
    AND event IN ('Audience Entered', 'Audience Exited')" || true
  kill -TERM "$pid"; wait "$pid" || true
  pkill -f "sluice-receiver --listen 127.0.0.1:$receiver_port" || true
  wait || true
}

phases="${SLUICE_BENCH_PHASES:-1 2}"
phase() { [[ " $phases " == *" $1 "* ]]; }
if phase 1; then run "1. Zipf over 1,000,000 users" "${SLUICE_SCALE_ZIPF_RATE:-50000}" --zipf 1; fi
if phase 2; then run "2. uniform over 1,000,000 users" "${SLUICE_SCALE_UNIFORM_RATE:-25000}"; fi
if phase 3; then restart "${SLUICE_SCALE_ZIPF_RATE:-50000}"; fi
