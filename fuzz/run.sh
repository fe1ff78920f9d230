#!/usr/bin/env bash
# Runs every fuzz target (cargo-fuzz, libFuzzer, nightly) for RUNS executions each (default
# 1,000,000), from the seeds in fuzz/seeds/ and the corpus kept in fuzz/corpus/ (git-ignored).
#   fuzz/run.sh                 # all targets
#   RUNS=20000 fuzz/run.sh sse  # one target, a short run
# A crash stops the script; its input is in fuzz/artifacts/<target>/ (replay it with
# `cargo +nightly fuzz run <target> <file>`). Figures of the last full run: docs/FUZZING.md.
set -euo pipefail
cd "$(dirname "$0")"
RUNS=${RUNS:-1000000}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(config_load inspect sse path retry_after)
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  start=$(date +%s)
  log="artifacts/$t.log"
  mkdir -p artifacts
  status=0
  cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
    -runs="$RUNS" -max_len=4096 -timeout=10 -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+== ERROR|SUMMARY)' "$log" || true
  echo "$t: $RUNS runs in $(( $(date +%s) - start )) s, exit $status"
  [ "$status" -eq 0 ] || { tail -n 40 "$log"; exit "$status"; }
done
