#!/usr/bin/env bash
# The profile stage's differential test with a long budget: random workloads (identity merges and
# aliases, duplicate messageIds, timestamps weeks off, segments added and edited while the stage
# is behind, crashes between batches) compared with an independent reference after each.
# `cargo test` runs 48 of them; this runs as many as you ask (default 10,000) and prints how many
# workloads and crash points it ran. A failure is shrunk and its seed saved in
# proptest-regressions/profile_stage/tests/differential.txt: commit it, it is tried first from then on.
#
#   tools/differential.sh [CASES]
set -euo pipefail
cd "$(dirname "$0")/.."
cases="${1:-10000}"
# Each workload's log, store and dedup live in a temporary folder; on tmpfs their fsyncs cost
# nothing, which makes a workload several times faster here.
[ -d /dev/shm ] && export TMPDIR="${TMPDIR:-/dev/shm}"
SLUICE_DIFFERENTIAL_CASES="$cases" cargo test --lib profile_stage::tests::differential -- --nocapture 2>&1 \
  | grep -E "^differential:|test result|panicked|minimal failing|Test failed" 
