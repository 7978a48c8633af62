# Sourced by the scripts in benches/: the protocol's common part. Builds the release binaries
# (skipped with SLUICE_NO_BUILD=1), makes a work folder `$work` that goes away on exit together with
# any server started on `$work/sluice.toml`, and starts sluice pinned to core 1.
#
#   source "$(dirname "$0")/common.sh"
#   write_config <<TOML   # $work/sluice.toml: listen on $port, the `bench` source, then stdin
#   start_sluice          # serves $work/sluice.toml; sets $pid; returns once /healthz answers on $port
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
[ -n "${SLUICE_NO_BUILD:-}" ] || cargo build --release --workspace --quiet
bin="$CARGO_TARGET_DIR/release"
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
  for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
}
