#!/usr/bin/env bash
# Where keypool's Redis work lands in a Redis Cluster (a program, not a test). Starts a cluster
# of MASTERS spawned redis-servers (default 3, at least 3), then keypool (dbtype none, `redis.cluster`) with
# GATEWAYS gateways (default 6), each with a rate limit kept in Redis, and three keys with rpm
# budgets leased from Redis (`lease: 64`); wrk sends DURATION seconds (default 10) of chat
# completions at 64 connections, spread evenly over the gateways. Then, per master: the scripts
# it ran and Redis's own time in them (`INFO commandstats`), and the busiest master's share.
# A fleet sharing the cluster is capped by its busiest master: with one master doing all of
# keypool's work the cap is one master's script rate; with the work spread, 1 / (busiest share)
# times that.
#
#   tests/load/cluster.sh
#   BASELINE=/tmp/keypool-old tests/load/cluster.sh    # the same run with another build too
#   BIN=/path/to/keypool GATEWAYS=12 tests/load/cluster.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
MASTERS=${MASTERS:-3}
GATEWAYS=${GATEWAYS:-6}
DURATION=${DURATION:-10}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
cargo build --release -q -p keypool-gateway
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/keypool}
WORK=$(mktemp -d)
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
low_port() { # a free port whose cluster bus port (+10000) is free too (Redis wants it <= 55535)
  python3 -c '
import random, socket
while True:
    p = random.randrange(20000, 45000)
    try:
        for q in (p, p + 10000):
            socket.socket().bind(("127.0.0.1", q))
    except OSError:
        continue
    print(p)
    break'
}
. tests/load/lib.sh

PORTS=()
for i in $(seq "$MASTERS"); do
  p=$(low_port)
  mkdir -p "$WORK/r$p"
  (cd "$WORK/r$p" && exec redis-server --port "$p" --cluster-enabled yes --cluster-config-file nodes.conf \
    --save "" --appendonly no > /dev/null) &
  PORTS+=("$p")
done
for p in "${PORTS[@]}"; do
  for _ in $(seq 100); do redis-cli -p "$p" ping > /dev/null 2>&1 && break; sleep 0.05; done
done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${PORTS[@]}") --cluster-replicas 0 --cluster-yes > /dev/null
for _ in $(seq 100); do
  redis-cli -p "${PORTS[0]}" cluster info | grep -q cluster_state:ok && break; sleep 0.1
done
NODES=$(printf '"redis://127.0.0.1:%s",' "${PORTS[@]}"); NODES=${NODES%,}

"$BIN" mock --address 127.0.0.1:0 > "$WORK/mock.out" 2>&1 &
wait_line "$WORK/mock.out" "listening on"
UP=$(url_in "$WORK/mock.out")
{
  echo "address: 127.0.0.1:0"
  echo "authorization: bench-token"
  echo "dbtype: none"
  echo "redis: {cluster: [$NODES], prefix: \"kp-spread:\", lease: 64, lease_ms: 1000}"
  echo "upstreams:"
  for k in 1 2 3; do echo "  - {name: k$k, sk: sk-bench-$k, endpoint: \"$UP\", rpm: 100000000}"; done
  echo "gateways:"
  for g in $(seq "$GATEWAYS"); do echo "  - {name: team-$g, rate_limits: [\"ingress:100000000/minute\"]}"; done
} > "$WORK/config.yaml"
{
  cat tests/load/chat.lua
  echo "local n, i = $GATEWAYS, 0"
  echo 'request = function() i = i + 1; return wrk.format(nil, "/llm/api/team-" .. (i % n + 1) .. "/v1/chat/completions") end'
} > "$WORK/gateways.lua"

stats() { # port: scripts run and microseconds in them
  redis-cli -p "$1" info commandstats | tr -d '\r' |
    awk -F'[=,:]' '/^cmdstat_(eval|evalsha|fcall)/ {n += $3; us += $5} END {print n + 0, us + 0}'
}
measure() { # name binary
  for p in "${PORTS[@]}"; do redis-cli -p "$p" flushall > /dev/null; redis-cli -p "$p" config resetstat > /dev/null; done
  RUST_LOG=warn "$2" serve --config "$WORK/config.yaml" --admin-address 127.0.0.1:0 > "$WORK/kp.out" 2> "$WORK/kp.err" &
  local pid=$!
  wait_line "$WORK/kp.out" "listening on http.*/v1" "$WORK/kp.err"
  local url; url=$(url_in "$WORK/kp.out"); url=${url%/v1}
  wrk -t1 -c8 -d1s -s "$WORK/gateways.lua" "$url" > /dev/null
  for p in "${PORTS[@]}"; do redis-cli -p "$p" config resetstat > /dev/null; done
  wrk -t1 -c64 -d"${DURATION}s" -s "$WORK/gateways.lua" "$url" > "$WORK/wrk.txt"
  local rps total_us=0 max_us=0 line=""
  rps=$(awk '/Requests\/sec/ {printf "%.0f", $2}' "$WORK/wrk.txt")
  grep -q 'Non-2xx' "$WORK/wrk.txt" && grep 'Non-2xx' "$WORK/wrk.txt"
  for p in "${PORTS[@]}"; do
    read -r n us <<< "$(stats "$p")"
    total_us=$((total_us + us)); [ "$us" -gt "$max_us" ] && max_us=$us
    line="$line  master :$p ${n} scripts ${us} us;"
  done
  echo "$1: $rps req/s;$line busiest master $(( total_us > 0 ? max_us * 100 / total_us : 0 ))% of Redis's time"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
measure "this build" "$BIN"
[ -z "${BASELINE:-}" ] || measure "baseline" "$BASELINE"
