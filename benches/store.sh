#!/usr/bin/env bash
# The profile store's workload on redb and on fjall (tools/storebench, its own workspace): fill
# with N values, saves of 20,000 random keys each synced, then random point reads; CPU per
# operation for the whole process, pinned to core 1 as the server is.
#
#   benches/store.sh [KEYS] [VALUE_BYTES]     # default 10000000 400
#
# Needs about 11 GB free under $TMPDIR (or /var/tmp) for redb at 10,000,000 keys.
set -euo pipefail
cd "$(dirname "$0")/.."
keys="${1:-10000000}"
value="${2:-400}"
target="${CARGO_TARGET_DIR:-$HOME/.cache/sluice/storebench-target}"
(cd tools/storebench && CARGO_TARGET_DIR="$target" cargo build --release --quiet)
dir="$(mktemp -d "${TMPDIR:-/var/tmp}/sluice-storebench.XXXXXX")"
trap 'rm -rf "$dir"' EXIT
for engine in fjall redb; do
  taskset -c 1 "$target/release/sluice-storebench" "$engine" "$dir/$engine" --keys "$keys" \
    --value "$value" --saves 50 --per-save 20000 --reads 200000
  rm -rf "${dir:?}/$engine"
done
