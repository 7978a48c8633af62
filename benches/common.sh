# Sourced by the scripts in benches/: the protocol's common part. Builds the binaries of the `fast` profile
# (skipped with SLUICE_NO_BUILD=1), makes a work folder `$work` that goes away on exit together with
# any server started on `$work/sluice.toml`, and starts sluice pinned to core 1.
#
#   source "$(dirname "$0")/common.sh"
#   write_config <<TOML   # $work/sluice.toml: listen on $port, the `bench` source, then stdin
#   start_sluice          # serves $work/sluice.toml; sets $pid; returns once /healthz answers on $port
#   metric; consumer_lag profiles; thread_id sluice-profiles; thread_cpu 20; warm_up_profiles;
#   delays Message
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
[ -n "${SLUICE_NO_BUILD:-}" ] || cargo build --profile fast --workspace --quiet
bin="$CARGO_TARGET_DIR/fast"
work="$(mktemp -d)"
bench_cleanup() { pkill -f "$work/sluice.toml" || true; rm -rf "$work"; }
trap bench_cleanup EXIT

write_config() {
  {
    printf '[server]\nlisten = "127.0.0.1:%s"\n' "$port"
    printf '[[sources]]\nname = "bench"\nwrite_key = "demo-server-key"\n'
    cat
  } > "$work/sluice.toml"
}

start_sluice() {
  SLUICE_LOG=warn taskset -c 1 "$bin/sluice" --config "$work/sluice.toml" serve &
  pid=$!
  for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "sluice did not answer on port $port (a config it cannot read?)" >&2
  exit 1
}

metric() { curl -fsS "http://127.0.0.1:$port/metrics"; }

# Records the log consumer named $1 has still to read.
consumer_lag() {
  metric | awk -v m="sluice_log_consumer_lag_records{consumer=\"$1\"}" '$1 == m {print $2}'
}

# The id of the server's thread named $1.
thread_id() { grep -l "^$1\$" /proc/"$pid"/task/*/comm | head -1 | cut -d/ -f5; }

# The server's CPU over $1 seconds, thread by thread (threads of one name added up), in % of one
# core, busiest first: where a saturated core's time goes. From /proc's utime + stime, in ticks.
thread_cpu() {
  local seconds="$1" hz; hz="$(getconf CLK_TCK)"
  ticks() {
    for task in /proc/"$pid"/task/*; do
      # comm may hold spaces; the counters are fields 14 and 15 after the ")" that ends it.
      printf '%s %s\n' "$(tr ' ' _ < "$task/comm")" \
        "$(sed 's/.*) //' "$task/stat" | awk '{print $12 + $13}')"
    done 2>/dev/null | awk '{t[$1] += $2} END {for (n in t) print n, t[n]}' | sort
  }
  ticks > "$work/ticks-before"; sleep "$seconds"; ticks > "$work/ticks-after"
  join "$work/ticks-before" "$work/ticks-after" | awk -v s="$seconds" -v hz="$hz" '
    {d = ($3 - $2) / hz / s * 100; all += d; if (d >= 0.1) printf "%s %.1f\n", $1, d}
    END {printf "all %.1f\n", all}' | sort -k2 -n -r | tr '\n' ' '
}

# The profile benches' warm-up: each of the 50,000 users of the web mix gets a profile and enters
# most of its segments (a one-off of about 20 changes per user, each emitted as two messages),
# then the stage catches up, so that what is measured after is the steady state of a running
# deployment. Prints how long the catching up took.
warm_up_profiles() {
  taskset -c 0 "$bin/sluice-loadgen" --addr "127.0.0.1:$port" --events web --mode batch --batch 100 \
    --connections 32 --rate 500 --duration 20 --pid "$pid" > /dev/null
  local waited=0
  while [ "$(consumer_lag profiles)" != "0" ] && [ "$waited" -lt 600 ]; do
    kill -0 "$pid" || { echo "sluice exited during the warm-up" >&2; exit 1; }
    sleep 1
    waited=$((waited + 1))
  done
  echo "warm-up: 1,000,000 messages; the stage caught up $waited s after the load stopped"
}

# The segment changes' delays (from their cause to the change durable in the log).
buckets() { metric | grep '^sluice_segment_change_delay_seconds_bucket{' || true; }
# Prints the bucket bounds holding the 50th and 99th percentiles of a cause's delays since the
# buckets were saved in $work/buckets (all of them when there is no such file).
delays() {
  buckets | awk -v cause="$1" -v before="$work/buckets" '
    BEGIN { while ((getline line < before) > 0) { split(line, f, " "); was[f[1]] = f[2] } }
    $0 ~ /^sluice_segment_change_delay_seconds_bucket\{/ && index($0, "cause=\"" cause "\"") {
      match($0, /le="[^"]+"/); le = substr($0, RSTART + 4, RLENGTH - 5); n[++k] = $2 - was[$1]; b[k] = le }
    END { total = n[k]; if (total == 0) { print cause ": no changes"; exit }
      for (i = 1; i <= k; i++) { if (!p50 && n[i] >= 0.5 * total) p50 = b[i]; if (!p99 && n[i] >= 0.99 * total) p99 = b[i]
        if (b[i] == "0.05") fast = n[i] }
      printf "%s: %d changes, p50 <= %s s, p99 <= %s s, %.2f %% within 50 ms\n", cause, total, p50, p99, 100 * fast / total }'
}
