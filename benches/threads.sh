#!/usr/bin/env bash
# Where the core goes: the server's CPU per thread over 10 s at a steady load, from
# /proc/<pid>/task/*/stat. Sluice on core 1; the load generator (and the webhook receiver when
# there are destinations) on core 0.
#
#   benches/threads.sh [MESSAGES_PER_SECOND] [fixed|web] [WEBHOOK_DESTINATIONS]
#
# Defaults: 25000 messages/s (/v1/batch, 100 per request), the fixed track, no destination.
# SLUICE_BENCH_SEGMENTS=1 loads the 50 segments of benches/fifty-segments/.
source "$(dirname "$0")/common.sh"
rate="${1:-25000}"
events="${2:-fixed}"
destinations="${3:-0}"
port=18091
receiver_port=19098
trap 'pkill -f "sluice-receiver --listen 127.0.0.1:$receiver_port" || true; bench_cleanup' EXIT

mkdir -p "$work/destinations"
write_config <<TOML
[destinations]
dir = "destinations"
TOML
if [ -n "${SLUICE_BENCH_SEGMENTS:-}" ]; then
  cp -r benches/fifty-segments "$work/segments"
  printf '[segments]\ndir = "segments"\n' >> "$work/sluice.toml"
fi
for i in $(seq 1 "$destinations"); do
  printf 'type = "webhook"\nurl = "http://127.0.0.1:%s/hook"\n[delivery]\nbatch_size = 100\n' \
    "$receiver_port" > "$work/destinations/webhook$i.toml"
done
if [ "$destinations" -gt 0 ]; then
  taskset -c 0 "$bin/sluice-receiver" --listen "127.0.0.1:$receiver_port" --warmup 3 --duration 20 \
    > "$work/receiver.out" &
  receiver=$!
fi
start_sluice
taskset -c 0 "$bin/sluice-loadgen" --addr "127.0.0.1:$port" --warmup 3 --duration 20 \
  --mode batch --batch 100 --connections 16 --rate "$((rate / 100))" --events "$events" \
  > "$work/load.out" &
load=$!

ticks() { # thread name and id, then user+system clock ticks
  for t in /proc/"$pid"/task/*; do
    printf '%s_%s %s\n' "$(tr ' ' _ < "$t/comm")" "${t##*/}" "$(awk '{print $14 + $15}' "$t/stat")"
  done | sort
}
sleep 8
ticks > "$work/before"
sleep 10
ticks > "$work/after"
hz="$(getconf CLK_TCK)"
echo "--- $rate messages/s offered, --events $events, $destinations webhook destination(s), segments: ${SLUICE_BENCH_SEGMENTS:-none}: share of one core over 10 s"
join "$work/before" "$work/after" \
  | awk -v hz="$hz" '{ share = ($3 - $2) / (10 * hz) * 100; if (share >= 0.5) printf "%-28s %5.1f %%\n", $1, share }' \
  | sort -k2 -rn
wait "$load"
grep acknowledged "$work/load.out"
kill -TERM "$pid"; wait "$pid" || true
if [ "$destinations" -gt 0 ]; then wait "$receiver"; cat "$work/receiver.out"; fi
