#!/usr/bin/env bash
# keypool benchmark: the mock upstream in no-delay mode, measured directly, through nginx as a
# plain reverse proxy (the floor for one hop, when nginx is installed; NGINX=0 skips it) and
# through keypool (3 keys, dbtype none), in the same run, alternating, with wrk pinned to one core.
#
#   tests/load/bench.sh            # DURATION=10 ROUNDS=2 by default
#
# Prints throughput at 64 connections (and the ratio to direct), latency percentiles at one
# keep-alive connection (and keypool's added p50/p99), and keypool's peak RSS.
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-2}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
cargo build --release -q -p keypool-gateway
BIN=target/release/keypool
WORK=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

wait_line() { # file pattern
  for _ in $(seq 100); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "timed out waiting for $2 in $1" >&2; cat "$1" >&2; exit 1
}

"$BIN" mock --address 127.0.0.1:0 --workers 1 > "$WORK/mock.out" 2>&1 &
wait_line "$WORK/mock.out" "listening on"
UP=$(grep -o 'http://[^ ]*' "$WORK/mock.out" | head -1)   # .../v1

cat > "$WORK/config.yaml" <<YAML
address: 127.0.0.1:0
authorization: bench-token
dbtype: ${BENCH_DBTYPE:-none}
upstreams:
  - {name: k1, sk: sk-bench-1, endpoint: "$UP"}
  - {name: k2, sk: sk-bench-2, endpoint: "$UP"}
  - {name: k3, sk: sk-bench-3, endpoint: "$UP"}
YAML
RUST_LOG=warn KEYPOOL_WORKERS=${KEYPOOL_WORKERS:-} "$BIN" serve --config "$WORK/config.yaml" > "$WORK/kp.out" 2> "$WORK/kp.err" &
KP_PID=$!
wait_line "$WORK/kp.out" "listening on"
KP=$(grep -o 'http://[^ ]*' "$WORK/kp.out" | head -1)

NG=""
if [ "${NGINX:-1}" = 1 ] && command -v nginx >/dev/null; then
  NG_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  UP_HOSTPORT=$(echo "$UP" | sed -E 's#http://([^/]+)/v1#\1#')
  cat > "$WORK/nginx.conf" <<NGX
worker_processes 2;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err;
events { worker_connections 1024; }
http {
  access_log off;
  upstream mock { server $UP_HOSTPORT; keepalive 128; }
  server {
    listen 127.0.0.1:$NG_PORT;
    location / { proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGX
  nginx -c "$WORK/nginx.conf" -g 'daemon off;' &
  sleep 0.5
  NG="http://127.0.0.1:$NG_PORT/v1"
fi

run() { # name url connections
  taskset -c 0 wrk -t1 -c"$3" -d"${DURATION}s" --latency -s tests/load/chat.lua "$2/chat/completions" > "$WORK/$1.txt"
  python3 - "$WORK/$1.txt" "$1" <<'PY' >> "$WORK/results.tsv"
import re, sys
text = open(sys.argv[1]).read()
def ms(v, unit):
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
pct = {p: ms(v, u) for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)", text, re.M)}
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
print(f"{sys.argv[2]}\t{rps}\t{pct.get('50', 0)}\t{pct.get('99', 0)}\t{errors.group(1) if errors else 0}")
PY
}

# warm up both paths
taskset -c 0 wrk -t1 -c8 -d2s -s tests/load/chat.lua "$UP/chat/completions" > /dev/null
taskset -c 0 wrk -t1 -c8 -d2s -s tests/load/chat.lua "$KP/chat/completions" > /dev/null
for r in $(seq "$ROUNDS"); do
  run "direct-64" "$UP" 64
  [ -n "$NG" ] && run "nginx-64" "$NG" 64
  run "keypool-64" "$KP" 64
  run "direct-1" "$UP" 1
  [ -n "$NG" ] && run "nginx-1" "$NG" 1
  run "keypool-1" "$KP" 1
done
RSS_KB=$(awk '/VmHWM/ {print $2}' "/proc/$KP_PID/status")

python3 - "$WORK/results.tsv" "$RSS_KB" <<'PY'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().strip().splitlines()]
def med(name, col):
    vals = [float(r[col]) for r in rows if r[0] == name]
    return statistics.median(vals) if vals else None
errs = sum(int(r[4]) for r in rows)
d64, k64 = med("direct-64", 1), med("keypool-64", 1)
d1p50, k1p50 = med("direct-1", 2), med("keypool-1", 2)
d1p99, k1p99 = med("direct-1", 3), med("keypool-1", 3)
print("| run (median of rounds) | direct | through keypool | keypool vs direct |")
print("|---|---|---|---|")
print(f"| throughput, 64 connections | {d64:,.0f} req/s | {k64:,.0f} req/s | {k64 / d64:.2f}x |")
print(f"| p50 latency, 1 keep-alive connection | {d1p50:.3f} ms | {k1p50:.3f} ms | +{k1p50 - d1p50:.3f} ms |")
print(f"| p99 latency, 1 keep-alive connection | {d1p99:.3f} ms | {k1p99:.3f} ms | +{k1p99 - d1p99:.3f} ms |")
n64, n1p50 = med("nginx-64", 1), med("nginx-1", 2)
if n64:
    print(f"| nginx as a plain reverse proxy, 64 connections | | {n64:,.0f} req/s | {n64 / d64:.2f}x |")
    print(f"| nginx p50, 1 keep-alive connection | | {n1p50:.3f} ms | +{n1p50 - d1p50:.3f} ms |")
print(f"| keypool peak RSS | | {int(sys.argv[2]) / 1024:.1f} MB | |")
print(f"| non-2xx responses | | {errs} | |")
PY
