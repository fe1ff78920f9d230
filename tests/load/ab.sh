#!/usr/bin/env bash
# A/B benchmark of two keypool binaries (e.g. before and after a change), same mock upstream,
# same config (3 keys, dbtype none), alternating rounds, wrk pinned to core 0.
#   tests/load/ab.sh /path/to/keypool-a /path/to/keypool-b      # DURATION=5 ROUNDS=3
set -euo pipefail
cd "$(dirname "$0")/../.."
A=$1; B=$2
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
WORK=$(mktemp -d)
# the two keypools are started inside $(...), so they are not this shell's jobs: their pids are
# kept in files for the exit to stop them too
trap 'kill $(jobs -p) $(cat "$WORK"/*.pid 2>/dev/null) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
. tests/load/lib.sh
"$A" mock --address 127.0.0.1:0 --workers 1 > "$WORK/mock.out" 2>&1 &
wait_line "$WORK/mock.out" "listening on"
UP=$(grep -o 'http://[^ ]*' "$WORK/mock.out" | head -1)
cat > "$WORK/config.yaml" <<YAML
address: 127.0.0.1:0
authorization: bench-token
dbtype: none
admin: {address: "127.0.0.1:0"}
upstreams:
  - {name: k1, sk: sk-bench-1, endpoint: "$UP"}
  - {name: k2, sk: sk-bench-2, endpoint: "$UP"}
  - {name: k3, sk: sk-bench-3, endpoint: "$UP"}
YAML
# a binary that predates the admin section gets the config without it
grep -v '^admin:' "$WORK/config.yaml" > "$WORK/config-plain.yaml"
start() { # bin name
  local cfg="$WORK/config.yaml"
  "$1" serve --help 2>/dev/null | grep -q admin-address || cfg="$WORK/config-plain.yaml"
  RUST_LOG=warn "$1" serve --config "$cfg" > "$WORK/$2.out" 2> "$WORK/$2.err" &
  echo $! > "$WORK/$2.pid"
  wait_line "$WORK/$2.out" "listening on"
  grep 'keypool listening on' "$WORK/$2.out" | grep -o 'http://[^ ]*' | head -1
}
UA=$(start "$A" a); UB=$(start "$B" b)
for u in "$UP" "$UA" "$UB"; do taskset -c 0 wrk -t1 -c8 -d2s -s tests/load/chat.lua "$u/chat/completions" > /dev/null; done
run() { # label url conns
  taskset -c 0 wrk -t1 -c"$3" -d"${DURATION}s" --latency -s tests/load/chat.lua "$2/chat/completions" \
    | awk -v l="$1" '/Requests\/sec/ {r=$2} /^ +50%/ {p=$2} END {print l, r, p}'
}
for _ in $(seq "$ROUNDS"); do
  run direct-64 "$UP" 64; run a-64 "$UA" 64; run b-64 "$UB" 64
  run direct-1 "$UP" 1; run a-1 "$UA" 1; run b-1 "$UB" 1
done | tee "$WORK/ab.txt"
