#!/usr/bin/env bash
# The whole server with profiles and 50 segments (benches/fifty-segments/: windows, counts, sums,
# first-occurrence ages, silence, traits, in_segment; two have second-long windows, so that time
# conditions flip on timers all through the run), the lake writer on file://, varied web traffic.
#
#   benches/segments.sh [SECONDS]
#
# 1. After a warm-up (1,000,000 messages, then the stage catches up), 50,000 messages/s (open loop)
#    for SECONDS: acknowledged rate, the messages the profile stage applied in each 5 s (as many as
#    offered = it keeps up), its log cursor's lag (which also waits for saves to commit), the rate
#    at which it applied messages, and the CPU time per message it applied of the profile thread
#    and of its saver (what a message costs, whatever share of the core they got).
# 2. After a warm-up, 25,000 messages/s for SECONDS: delay from a message's arrival (or a time
#    condition's moment) to its Audience Entered/Exited being durable in the log, from the
#    server's histogram (the run's share of it), and the profile store's saves in the run.
# 3. 1,000,000 distinct users at 50,000 messages/s (SLUICE_BENCH_MEMORY_RATE) for 2×SECONDS: RSS
#    every 10 s, profiles every 30 s, and the store's size.
# SLUICE_BENCH_PHASES="3" runs only the phases named; SLUICE_BENCH_SAVE_INTERVAL sets
# profiles.save_interval (default: the config's, 5s); SLUICE_BENCH_LAKE_NICE renices the lake
# writer (its thread name is cut to 15 characters in /proc: sluice-lake-wri).
# Protocol as in benches/load.sh: sluice (the `fast` profile) on core 1, the load generator on core 0.
source "$(dirname "$0")/common.sh"
seconds="${1:-60}"
port=18090
cp -r benches/fifty-segments "$work/segments"
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
${SLUICE_BENCH_SAVE_INTERVAL:+save_interval = \"$SLUICE_BENCH_SAVE_INTERVAL\"}
TOML

start() {
  rm -rf "$work/data"
  start_sluice
  # The lake writer runs at nice 19; SLUICE_BENCH_LAKE_NICE=0 compares with it at the edge's.
  if [ -n "${SLUICE_BENCH_LAKE_NICE:-}" ]; then
    renice -n "$SLUICE_BENCH_LAKE_NICE" -p "$(thread_id sluice-lake-wri)" > /dev/null
  fi
}
lag() { consumer_lag profiles; }
stop() { kill -TERM "$pid"; wait "$pid" || true; }
changes() { metric | grep '^sluice_segment_changes_total{' || true; }
# Saves so far: count, seconds in all, profiles written, and how many took 1 s or less.
saves() {
  metric | awk '/^sluice_profile_save_seconds_count / {c = $2} /^sluice_profile_save_seconds_sum / {t = $2}
    /^sluice_profile_saved_profiles_total / {p = $2} /^sluice_profile_save_seconds_bucket\{le="1.0"\}/ {q = $2}
    END {print c, t, p, q}'
}
# The stage's pauses for saves at $1 (HandOff, Wait or Commit): count, seconds in all, how many within 50 ms.
pauses() {
  metric | awk -v at="at=\"$1\"" 'index($0, at) == 0 { next }
    /^sluice_profile_save_pause_seconds_count/ {c = $2} /^sluice_profile_save_pause_seconds_sum/ {t = $2}
    /^sluice_profile_save_pause_seconds_bucket/ && /le="0.05"/ {q = $2} END {print c + 0, t + 0, q + 0}'
}

# A histogram's count, sum, and how many observations were within its first bound at or over $2
# seconds, and that bound.
histogram() {
  metric | awk -v name="$1" -v t="$2" '
    index($0, name "_count ") == 1 {c = $2} index($0, name "_sum ") == 1 {s = $2}
    index($0, name "_bucket{") == 1 && !q_set {
      match($0, /le="[^"]+"/); b = substr($0, RSTART + 4, RLENGTH - 5)
      if (b + 0 >= t) { q = $2; le = b; q_set = 1 } }
    END {print c + 0, s + 0, q + 0, le}'
}
# What histogram $2 counted since `histogram` saved it in $work/$1: "N <$4>, X ms on average, M of
# them over B ms" (B: its first bound at or over $3 seconds). With $5 = records, the histogram
# counts records, not seconds.
since() {
  histogram "$2" "$3" | awk -v what="$4" -v unit="${5:-ms}" -v before="$work/$1" '
    BEGIN { getline line < before; split(line, b, " "); scale = unit == "ms" ? 1000 : 1 }
    { n = $1 - b[1]; if (n > 0) printf "%d %s, %.1f %s on average, %d of them over %g %s\n",
        n, what, scale * ($2 - b[2]) / n, unit, n - ($3 - b[3]), scale * $4, unit }'
}

phases="${SLUICE_BENCH_PHASES:-1 2 3}"
memory_rate="${SLUICE_BENCH_MEMORY_RATE:-50000}"
phase() { [[ " $phases " == *" $1 "* ]]; }

if phase 1; then
echo "--- 1. 50,000 messages/s for $seconds s, after a warm-up: 50 segments, lake, profiles"
start
warm_up_profiles
applied() { metric | awk '/^sluice_profile_messages_total / {print $2}'; }
# CPU time of a thread, in clock ticks (1/100 s): the profile stage's, and its saver's.
ticks() { awk '{print $14 + $15}' "/proc/$pid/task/$(thread_id "$1")/stat"; }
before="$(applied)"
ticks_before="$(ticks sluice-profiles)"
saver_before="$(ticks sluice-saver)"
# Every 5 s: the stage's log cursor (it moves when a save commits, so it includes the saver's
# delay), the lake's, and the count of messages the stage applied (its own progress).
( for _ in $(seq 1 $((seconds / 5 + 1))); do sleep 5
    printf '%s ' "$(lag)" >> "$work/lag"
    printf '%s ' "$(consumer_lag lake)" >> "$work/lake_lag"
    printf '%s ' "$(applied)" >> "$work/applied"
  done ) &
sampler=$!
started="$(date +%s%N)"
taskset -c 0 "$bin/sluice-loadgen" --addr "127.0.0.1:$port" --events web --mode batch --batch 100 \
  --connections 32 --rate 500 --duration "$seconds" --pid "$pid"
wait "$sampler" || true
elapsed_ms=$(( ($(date +%s%N) - started) / 1000000 ))
applied_now="$(applied)"
ticks="$(( $(ticks sluice-profiles) - ticks_before ))"
saver_ticks="$(( $(ticks sluice-saver) - saver_before ))"
per_message() { echo "$(( $1 * 10000 / (applied_now > before ? applied_now - before : 1) ))"; }
echo "log cursor of the profile stage, records behind the log end, every 5 s: $(cat "$work/lag")"
echo "log cursor of the lake writer, records behind, every 5 s: $(cat "$work/lake_lag")"
echo "messages the stage applied in each 5 s (250,000 offered; equal = it keeps up): $(
  awk -v b="$before" '{for (i = 1; i <= NF; i++) {printf "%d ", $i - b; b = $i}}' "$work/applied")"
echo "profile stage applied $((applied_now - before)) messages in $((elapsed_ms / 1000)) s: $(( (applied_now - before) * 1000 / elapsed_ms )) per second"
echo "profile thread CPU: $((ticks / 100)) s, $(per_message "$ticks") µs per message applied"
echo "saver thread CPU: $((saver_ticks / 100)) s, $(per_message "$saver_ticks") µs per message applied"
echo "both: $(per_message $((ticks + saver_ticks))) µs per message applied"
metric | grep -E '^sluice_(profiles|profile_messages_total|segment_timer_wakeups_total) '
stop

fi

if phase 2; then
echo "--- 2. 25,000 messages/s for $seconds s, after a warm-up: change delays"
start
warm_up_profiles
buckets > "$work/buckets"
saves > "$work/saves"
pauses HandOff > "$work/pauses.HandOff"
pauses Wait > "$work/pauses.Wait"
pauses Commit > "$work/pauses.Commit"
changes > "$work/changes"
histogram sluice_profile_batch_seconds 0.02 > "$work/batches"
histogram sluice_profile_batch_records 500 > "$work/batch_records"
histogram sluice_log_fsync_duration_seconds 0.01 > "$work/fsyncs"
histogram sluice_log_fsync_duration_seconds 0.05 > "$work/slow_fsyncs"
histogram sluice_lake_flush_duration_seconds 0.05 > "$work/flushes"
taskset -c 0 "$bin/sluice-loadgen" --addr "127.0.0.1:$port" --events web --mode batch --batch 100 \
  --connections 32 --rate 250 --duration "$seconds" --pid "$pid"
sleep 2
delays Message
delays Timer
echo "most changes in the run, by segment and direction:"
changes | awk -v before="$work/changes" '
  BEGIN { while ((getline line < before) > 0) { split(line, f, " "); was[f[1]] = f[2] } }
  { print $2 - was[$1], $1 }' | sort -rn | head -6
# The saves of the profile store in the run (on the saver thread, while the stage goes on).
saves | awk -v before="$work/saves" '
  BEGIN { getline line < before; split(line, b, " ") }
  { n = $1 - b[1]; if (n > 0) printf "saves: %d, %.2f s each on average, %d profiles each, %d of them over 1 s\n",
      n, ($2 - b[2]) / n, ($3 - b[3]) / n, n - ($4 - b[4]) }'
for at in HandOff Wait Commit; do
  pauses "$at" | awk -v at="$at" -v before="$work/pauses.$at" '
    BEGIN { getline line < before; split(line, b, " ") }
    { n = $1 - b[1]; if (n > 0) printf "the stage paused at a save'"'"'s %s %d times, %.1f ms on average, %d of them over 50 ms\n",
        at, n, 1000 * ($2 - b[2]) / n, n - ($3 - b[3]) }'
done
since batches sluice_profile_batch_seconds 0.02 "batches of the stage"
since batch_records sluice_profile_batch_records 500 "batches of the stage" records
# What else shares the core and the disk with the stage.
since fsyncs sluice_log_fsync_duration_seconds 0.01 "group commits of the log"
since slow_fsyncs sluice_log_fsync_duration_seconds 0.05 "group commits of the log"
since flushes sluice_lake_flush_duration_seconds 0.05 "lake flushes"
stop

fi

if phase 3; then
echo "--- 3. 1,000,000 users at $memory_rate messages/s for $((2 * seconds)) s: memory"
start
( for _ in $(seq 1 $((2 * seconds / 30))); do sleep 30
    printf '%s ' "$(metric | awk '/^sluice_profiles / {print $2}')"; done ) > "$work/profiles" &
sampler=$!
taskset -c 0 "$bin/sluice-loadgen" --addr "127.0.0.1:$port" --events web --users 1000000 --mode batch \
  --batch 100 --connections 32 --rate "$((memory_rate / 100))" --duration "$((2 * seconds))" --pid "$pid"
wait "$sampler" || true
echo "profiles every 30 s: $(cat "$work/profiles")"
sleep 5
metric | grep -E '^sluice_profiles |^sluice_log_consumer_lag_records\{consumer="profiles"\}'
du -sh "$work/data/profiles" "$work/data/lake" "$work/data/log"
stop
fi
