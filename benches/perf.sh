#!/usr/bin/env bash
# Where the profile stage's time goes: `perf record` (DWARF call graphs) on the profile thread for
# SECONDS while the load generator offers RATE messages/s of the web mix with the 50 segments of
# benches/fifty-segments/ loaded, then the report by inclusive share and by self time.
# SLUICE_BENCH_WARM=1 first runs the warm-up of benches/segments.sh (1,000,000 messages, then the
# stage catches up), to look at the steady state rather than the first minute. Needs `perf`.
#
#   benches/perf.sh [RATE] [SECONDS]
source "$(dirname "$0")/common.sh"
rate="${1:-10000}"
seconds="${2:-5}"
port=18094
cp -r benches/fifty-segments "$work/segments"
write_config <<TOML
[segments]
dir = "segments"
TOML
load() { # rate (requests/s) and duration
  taskset -c 0 "$bin/sluice-loadgen" --addr "127.0.0.1:$port" --events web --mode batch --batch 100 \
    --connections 32 --rate "$1" --duration "$2"
}
start_sluice
[ -z "${SLUICE_BENCH_WARM:-}" ] || warm_up_profiles
load "$((rate / 100))" "$((seconds + 10))" > "$work/load.out" &
loader=$!
sleep 5
thread="$(thread_id sluice-profiles)"
perf record --call-graph dwarf,16384 -F 499 -t "$thread" -o "$work/perf.data" -- sleep "$seconds" \
  > /dev/null 2>&1
wait "$loader"
grep acknowledged "$work/load.out"
echo "profile stage lag (records): $(consumer_lag profiles)"
perf report -i "$work/perf.data" --children --percent-limit 2.5 --stdio -g none 2>/dev/null \
  | grep -E '^ +[0-9]' | grep -v 'kernel\|inlined\|unknown' | head -40
echo "--- self time"
perf report -i "$work/perf.data" --no-children --percent-limit 0.7 --stdio -g none 2>/dev/null \
  | grep -E '^ +[0-9]' | grep -v 'kernel\|unknown' | head -40
