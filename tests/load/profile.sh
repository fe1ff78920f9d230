#!/usr/bin/env bash
# Instructions per request of one keypool worker, by callgrind (a program, not a test; this
# VM has no hardware counters for perf, and instruction counts repeat where timings do not).
# keypool (release, KEYPOOL_WORKERS=1, dbtype none, 3 keys) runs under valgrind against the
# mock upstream; wrk warms it up with instrumentation off, then 15 s at 4 connections are
# recorded. Prints the requests measured, the instructions per request and the top functions.
# Note: valgrind counts each byte of a `rep movsb`/`rep stosb` as an instruction, so memcpy and
# memset weigh more here than in cycles.
#
#   tests/load/profile.sh                      # the build of this tree
#   BIN=/tmp/keypool-old tests/load/profile.sh # another build (MOCK_BIN: the mock of another)
#   REDIS=1 tests/load/profile.sh              # rpm budgets kept in the Redis on 127.0.0.1:6379
#   STREAM=1 tests/load/profile.sh             # streamed completions (the mock sends at once)
#   STREAM=1 GAP_MS=2 tests/load/profile.sh    # streamed, the mock GAP_MS between events (each
#                                              # event its own read and write: the relay's cost)
#   STREAM=1 RESPONSES=1 tests/load/profile.sh # streamed Responses API requests instead
#   CONNS=64 tests/load/profile.sh             # 64 connections instead of 4
#   SYSCALLS=1 tests/load/profile.sh           # system calls per request instead (strace -c on
#                                              # every thread, same load, no valgrind)
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind; }
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
if [ -z "${BIN:-}" ]; then
  cargo build --release -q -p keypool-gateway
  BIN=${CARGO_TARGET_DIR:-target}/release/keypool
fi
W=$(mktemp -d)
OUT=${OUT:-$W/callgrind.out}
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  redis-cli --scan --pattern "kp-profile-$$:*" 2>/dev/null | xargs -r redis-cli del > /dev/null 2>&1 || true
}
trap cleanup EXIT
"${MOCK_BIN:-$BIN}" mock --address 127.0.0.1:0 --workers 1 --chunk-interval-ms "${GAP_MS:-0}" > "$W/mock.out" 2>&1 &
for _ in $(seq 50); do grep -q "listening on" "$W/mock.out" 2>/dev/null && break; sleep 0.1; done
UP=$(grep -o 'http://[^ ]*' "$W/mock.out" | head -1)
LIMIT="" SHARED=""
if [ "${REDIS:-0}" = 1 ]; then
  LIMIT=", rpm: 100000000"
  SHARED="redis: {url: \"redis://127.0.0.1:6379/0\", prefix: \"kp-profile-$$:\"}"
fi
. tests/load/lib.sh
three_keys "$UP" "$LIMIT" "$SHARED" > "$W/config.yaml"
LUA=$W/request.lua
ENDPOINT=chat/completions
cp tests/load/chat.lua "$LUA"
if [ "${STREAM:-0}" = 1 ]; then
  sed -i 's/"model":"gpt-4o-mini",/"model":"gpt-4o-mini","stream":true,/' "$LUA"
fi
if [ "${RESPONSES:-0}" = 1 ]; then
  ENDPOINT=responses
  sed -i 's/"messages":\[{"role":"user","content":"Hello there"}\]/"input":"Hello there"/' "$LUA"
fi
RUN="valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$OUT"
[ "${SYSCALLS:-0}" = 1 ] && RUN=""
# set, so keypool does not run itself again at start (valgrind would not follow the exec)
MIMALLOC_PURGE_DELAY=100 KEYPOOL_WORKERS=1 RUST_LOG=warn $RUN \
  "$BIN" serve --config "$W/config.yaml" --admin-address 127.0.0.1:0 --console-address none > "$W/kp.out" 2> "$W/kp.err" &
KP=$!
for _ in $(seq 300); do grep -q "listening on http.*/v1" "$W/kp.out" 2>/dev/null && break; sleep 0.2; done
URL=$(grep -v -e 'admin listening' -e 'console at' "$W/kp.out" | grep -o 'http://[^ ]*' | head -1)
served() { curl -s "${URL%/v1}/metrics" | awk '/^keypool_requests_total/ {n += $2} END {print n + 0}'; }
wrk -t1 -c4 -d5s -s "$LUA" "$URL/$ENDPOINT" > /dev/null
if [ "${SYSCALLS:-0}" = 1 ]; then
  command -v strace >/dev/null || { apt-get update -qq && apt-get install -y -qq strace; }
  strace -c -o "$W/strace.out" $(ls /proc/$KP/task | sed 's/^/-p /') 2> /dev/null &
  ST=$!
  sleep 1
  S0=$(served)
  wrk -t1 -c"${CONNS:-4}" -d15s -s "$LUA" "$URL/$ENDPOINT" > /dev/null
  S1=$(served)
  kill -INT $ST; wait $ST 2>/dev/null || true
  N=$((S1 - S0))
  echo "requests measured: $N"
  awk -v n="$N" '$NF ~ /^[a-z_0-9]+$/ && $4 ~ /^[0-9]+$/ {printf "  %-16s %6.2f a request\n", $NF, $4 / n}'  "$W/strace.out"
  exit 0
fi
callgrind_control -i on "$KP" > /dev/null 2>&1
S0=$(served)
wrk -t1 -c"${CONNS:-4}" -d15s -s "$LUA" "$URL/$ENDPOINT" > /dev/null
S1=$(served)
callgrind_control -i off "$KP" > /dev/null 2>&1
callgrind_control -d "$KP" > /dev/null 2>&1
sleep 1
DUMP=$(ls "$OUT".* | tail -1)
TOTAL=$(callgrind_annotate "$DUMP" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "requests measured: $((S1 - S0)); instructions per request: $((TOTAL / (S1 - S0)))"
callgrind_annotate "$DUMP" 2>/dev/null | sed -n '/PROGRAM TOTALS/,$p' | sed -n '5,30p' | cut -c1-160
echo "inclusive, keypool's own:"
callgrind_annotate --inclusive=yes "$DUMP" 2>/dev/null | grep -E '(keypool|prometheus)' | grep -v Profiled | head -15 | cut -c1-160
[ "$OUT" = "$W/callgrind.out" ] || echo "profile kept in $DUMP"
