#!/usr/bin/env bash
# The fuzz campaign: every target of `sluice::fuzz` under libFuzzer (cargo-fuzz, `fuzz/`), on the
# stable toolchain (coverage-guided, no sanitizer: the code is safe Rust; panics, aborts, timeouts
# and memory over the limit are what it finds).
#
#   tools/fuzz.sh [RUNS_PER_TARGET] [TARGET...]     default: 1000000 runs of every target
#   SLUICE_FUZZ_SECONDS=600 tools/fuzz.sh 0 body    run by time instead (runs 0 = until then)
#
# Each target starts from its seeds (the shipped examples and real SDK payloads, written by the
# smoke test in `cargo test`) and the corpus kept from earlier runs in $SLUICE_FUZZ_CORPUS
# (default ~/.cache/sluice/fuzz-corpus/<target>). A crashing input is saved as
# fuzz/artifacts/<target>/crash-*; rerun one with `cargo fuzz run -s none <target> <file>`.
# The targets are built once, at the start, from the source as it is then.
# Prints the cases each target ran and the total; exits 1 if any target found a crash.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-1000000}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(body sdk_payloads config schema segment destination log_record stored_profile queue_entry rhai)
fi
seconds="${SLUICE_FUZZ_SECONDS:-0}"
# libFuzzer reads -runs=0 as "run nothing" and -runs=-1 as "no limit".
if [ "$runs" = 0 ]; then runs=-1; fi
corpus_root="${SLUICE_FUZZ_CORPUS:-$HOME/.cache/sluice/fuzz-corpus}"
export CARGO_TARGET_DIR="${SLUICE_FUZZ_TARGET_DIR:-$HOME/.cache/sluice/fuzz-target}"

if ! command -v cargo-fuzz >/dev/null; then
  cargo install --locked cargo-fuzz
fi

# The seeds, from the same code the smoke test runs.
seeds="$(mktemp -d)"
trap 'rm -rf "$seeds"' EXIT
SLUICE_FUZZ_SEEDS="$seeds" CARGO_TARGET_DIR="${SLUICE_TEST_TARGET_DIR:-$HOME/.cache/sluice/target}" \
  cargo test --quiet --lib fuzz::tests >/dev/null

# One build for the whole campaign; the targets' binaries are then run as they are (`cargo fuzz
# run` would rebuild them whenever the source changed meanwhile).
cargo fuzz build -s none --debug-assertions
binaries="$CARGO_TARGET_DIR/$(rustc -vV | sed -n 's/^host: //p')/release"

total=0
failed=()
for target in "${targets[@]}"; do
  corpus="$corpus_root/$target"
  mkdir -p "$corpus"
  log="$(mktemp)"
  echo "=== $target: $( [ "$runs" != -1 ] && echo "$runs runs" )$( [ "$seconds" != 0 ] && echo " for at most $seconds s")"
  mkdir -p "fuzz/artifacts/$target"
  if "$binaries/$target" "$corpus" "$seeds/$target" -runs="$runs" -max_total_time="$seconds" \
      -max_len=65536 -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
      -artifact_prefix="fuzz/artifacts/$target/" >"$log" 2>&1; then
    :
  else
    failed+=("$target")
    grep -E "panicked|ERROR|SUMMARY|Test unit written" "$log" | head -20 || true
  fi
  done_runs=$(grep -oE '^stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1)
  done_runs=${done_runs:-0}
  echo "$target: $done_runs cases"
  total=$((total + done_runs))
  rm -f "$log"
done
echo "=== $total cases in all"
if [ ${#failed[@]} -gt 0 ]; then
  echo "crashes in: ${failed[*]} (inputs under fuzz/artifacts/)"
  exit 1
fi
