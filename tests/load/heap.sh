#!/usr/bin/env bash
# What keypool's heap holds while many SSE streams are open (a program, not a test): keypool
# built with the system allocator (`--no-default-features`, so heaptrack sees every
# allocation), `dbtype: none`, three keys on the mock streaming an event every 500 ms, runs
# under heaptrack while tests/load/streams.rs opens STREAMS streams over 2 s and reads them to
# their end. Prints the peak heap, the heap a stream and the allocation sites holding the most
# at that peak.
#
#   tests/load/heap.sh                          # 2,000 streams through the build of this tree
#   STREAMS=4000 tests/load/heap.sh
#   BIN=/tmp/keypool-sys tests/load/heap.sh     # another system-allocator build
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v heaptrack >/dev/null || { apt-get update -qq && apt-get install -y -qq heaptrack; }
STREAMS=${STREAMS:-2000}
T=${CARGO_TARGET_DIR:-target}
if [ -z "${BIN:-}" ]; then
  # its own target directory: the feature change would otherwise relink the default build
  CARGO_TARGET_DIR=$T/heap cargo build --release -q -p keypool-gateway --no-default-features
  BIN=$T/heap/release/keypool
fi
cargo build --release -q -p keypool-e2e --example streams
W=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"
. tests/load/lib.sh
"$BIN" mock --address 127.0.0.1:0 --workers 1 --chunk-interval-ms 500 > "$W/mock.out" 2>&1 &
wait_line "$W/mock.out" "listening on"
three_keys "$(url_in "$W/mock.out")" > "$W/config.yaml"
# KEYPOOL_WORKERS set: keypool does not run itself again at start (heaptrack would lose it)
KEYPOOL_WORKERS=2 RUST_LOG=warn heaptrack -o "$W/heap" "$BIN" serve --config "$W/config.yaml" \
  --admin-address 127.0.0.1:0 --console-address none > "$W/kp.out" 2> "$W/kp.err" &
wait_line "$W/kp.out" "listening on http.*/v1" "$W/kp.err"
URL=$(url_in "$W/kp.out")
"$T/release/examples/streams" "$URL/chat/completions" bench-token 20 500 100 > /dev/null
"$T/release/examples/streams" "$URL/chat/completions" bench-token "$STREAMS" 500 2000 > "$W/streams.json"
KP=$(pgrep -f "^$BIN serve --config $W/config.yaml" | head -1)
kill -TERM "$KP"
for _ in $(seq 100); do kill -0 "$KP" 2>/dev/null || break; sleep 0.2; done
sleep 2
cat "$W/streams.json"
DATA=$(ls "$W"/heap.* | head -1)
heaptrack_print -f "$DATA" -p 1 -a 0 -T 0 -l 0 -n 25 -s 0 > "$W/print.txt" 2>/dev/null || true
grep -E '^peak heap memory consumption' "$W/print.txt" | sed "s/\$/ at $STREAMS streams (idle part included)/"
# each of the top sites: what it held at the peak, over how many allocations, and where
awk '/^PEAK MEMORY CONSUMERS/ {on = 1; next} on && /peak memory consumed over/ {held = $1; calls = $6; getline; sub(/::h[0-9a-f]{16}$/, ""); printf "  %8s over %6s calls  %s\n", held, calls, substr($0, 1, 110)}' "$W/print.txt"
echo "heaptrack data kept in $DATA"
