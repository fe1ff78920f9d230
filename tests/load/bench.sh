#!/usr/bin/env bash
# keypool benchmark (a program, not a test). wrk pinned to core 0; everything else shares the
# machine's cores. Every target is started first and the rounds alternate between them (direct,
# nginx, each keypool), each round starting one target later, so a slow stretch of this VM hits
# them all alike and none always runs after the others (ROUNDS a multiple of the number of
# targets gives every target every place equally):
#   - the mock upstream in no-delay mode, directly;
#   - nginx as a plain keep-alive reverse proxy to it (the floor for one hop; NGINX=0 skips it);
#   - keypool with 3 keys for each mode in STORES (default "none sqlite postgres"; request-body
#     logging off; postgres uses a fresh database on 127.0.0.1:5432, dropped afterwards, over
#     TCP with sqlx's default TLS negotiation (this machine's server offers TLS, so it is TLS);
#     pglocal the same over the Unix socket in /var/run/postgresql (PGSOCKET), how a database on
#     the same host is reached: no TCP, no TLS);
#     `rpm` = dbtype none with an rpm budget on every key (exact in-process windows), `redis` =
#     the same budgets kept in the Redis on 127.0.0.1:6379 (one admission script per request;
#     the round trips per request are counted from Redis's command stats); `redislease` = the
#     same with `redis.lease` (LEASE calls, default 64, reserved per round trip, spent within
#     1 s); `redispick` = Redis
#     without budgets (the least-used pick across replicas only), `picklease` the same with
#     `redis.lease` (the picks leased too); `gw`, `gwredis`, `gwlease` =
#     `rpm`, `redis`, `redislease` with a gateway rate limit on top (`rate_limits:
#     [ingress:100000000/minute]`): in process, one admission and one pick script per request,
#     and both leased; `gw2`, `gw2redis`, `gw2lease` the same with a caller's limit beside it
#     (`secret:100000000/minute` too: two holders of leases, the gateway's and the caller's);
#     `sess`, `sessredis`, `sesslease` = `rpm`, `redis`, `redislease` with `affinity:` and every
#     request in one session (`x-session-id`): in process, the pick script reading and renewing
#     the session, and leased (the replica spends the session's key's lease);
#     `usd`, `usdredis`, `usdlease` = a USD budget on `/v1` (`budget: {usd:
#     1000000, period: total}`): in process, held and settled in Redis (with the pick: three
#     scripts a request), and held in slices with the picks leased; `quotaredis`, `quotalease` =
#     `redispick`, `picklease` with a token quota on `/v1` (`token_quota: 100000000000`): its
#     count read for every request (a GET) and added to after it (an INCRBY), and read at
#     most once a `lease_ms` (the additions' answers refresh it); `tpm`, `tpmredis`, `tpmlease` =
#     `rpm`, `redis`, `redislease` with a `tpm` on every key too (each pick reserves its
#     estimate in the key's token window and settles the real count after; leased: a token
#     slice of an estimate per call beside the calls); `frontends` = the production
#     topology: `keypool admin` (SQLite) feeding two `keypool frontend`s that share the rpm
#     budgets in Redis, measured on one frontend, then both loaded at once (2 x 32 connections).
#     `before` = dbtype none served by another build of keypool, BASELINE=/path/to/keypool (e.g.
#     one built from the commit before a change): before and after in the same run, rounds
#     alternating, its ratio to `none` printed per round; `before-STORE` (e.g. `before-quotalease`)
#     the same for another store's config.
# REDIS2=1 adds two `serve` replicas sharing the Redis budgets, loaded at once (needs redis).
# OVERLOAD=1 adds a run that saturates the usage writer (SQLite, `log.queue_capacity: 64`,
# `on_overflow: spill`), stops keypool with SIGTERM and reports answered 200s against the usage
# events stored (they must be equal).
# Knobs for a many-core machine (defaults: every core shared, as on the 2-core VM):
#   WORKERS=N      keypool's KEYPOOL_WORKERS and nginx's worker_processes (default: the cores
#                  PROXY_CPUS leaves, else all), the same for both;
#   WRK_CPUS=0-3   the cores wrk runs on (default 0), WRK_THREADS=N its threads (default 1);
#   PROXY_CPUS=4-11, UP_CPUS=12-15, UP_WORKERS=N   taskset for nginx and keypool, for the mock
#                  upstream, and the mock's workers (default 1);
#   MANY=2048      adds a many-connection run per target (throughput, p50/p99, the proxy's RSS
#                  during it, 1 s and 20 s after, and what a connection costs in memory);
#   UPHOST=name    the mock upstreams named by this host in keypool's and nginx's configs instead
#                  of 127.0.0.1 (localhost, or a name a resolver answers: keypool looks a host up
#                  for its first connections and every 30 s, nginx once at start), so what a new
#                  upstream connection's address lookup costs is in the runs;
#   UPTLS=1        the mocks behind a TLS front of their own (nginx, one worker, on UP_CPUS), so
#                  keypool's and nginx's upstream connections are TLS, verified, as a
#                  provider's are (direct: wrk over TLS too; the streams client has no TLS, so
#                  direct streams stay plain); needs openssl;
#   STREAMS=N      adds a streams run: the mock streaming slowly (STREAM_INTERVAL ms between
#                  events, default 500), N concurrent SSE streams opened over RAMP_MS (default
#                  2000) by tests/load/streams.rs against the mock, nginx (proxy_buffering off)
#                  and keypool (dbtype none; and BASELINE's build too when STORES has
#                  `before`): how many ended whole, the most open at once, time to first
#                  event and each event's lateness (p50/p99), the proxy's idle and peak RSS
#                  and the memory per stream.
# Every row shows the proxy's RSS after its runs (nginx: master and workers summed).
# Prints throughput at 64 connections and latency at 1 keep-alive connection (medians of ROUNDS
# rounds of DURATION seconds) beside direct, keypool's peak RSS, and for stores the requests
# answered beside the usage events written (nothing may be dropped).
#
#   tests/load/bench.sh                    # DURATION=10 ROUNDS=3
#   STORES=none DURATION=5 ROUNDS=1 tests/load/bench.sh
#   STORES="none before" BASELINE=/tmp/keypool-main tests/load/bench.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
STORES=${STORES:-none sqlite postgres}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
# NO_BUILD=1: the binaries are given (KEYPOOL_BIN, STREAMS_BIN), as on a machine without Rust
# that tests/load/pack.sh packed them for
if [ -z "${NO_BUILD:-}" ]; then
  cargo build --release -q -p keypool-gateway
  [ -z "${STREAMS:-}" ] || cargo build --release -q -p keypool-e2e --example streams
fi
# KEYPOOL_BIN=/path/to/keypool: that build as `none` (and as the mock), e.g. for a streams or
# many-connection run of another build, which `before` does not get; MOCK_BIN=/path/to/keypool:
# another build's mock (the same upstream for two builds' runs)
BIN=${KEYPOOL_BIN:-${CARGO_TARGET_DIR:-target}/release/keypool}
MOCK=${MOCK_BIN:-$BIN}
STREAMS_BIN=${STREAMS_BIN:-${CARGO_TARGET_DIR:-target}/release/examples/streams}
WRK_CPUS=${WRK_CPUS:-0}
WRK_THREADS=${WRK_THREADS:-1}
PROXY_PIN=(); [ -z "${PROXY_CPUS:-}" ] || PROXY_PIN=(taskset -c "$PROXY_CPUS")   # exec'd: $! is the proxy
UP_PIN=(); [ -z "${UP_CPUS:-}" ] || UP_PIN=(taskset -c "$UP_CPUS")
WORKERS=${WORKERS:-$("${PROXY_PIN[@]}" nproc)}
export KEYPOOL_WORKERS=$WORKERS
WORK=$(mktemp -d)
PGDBS=""
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  for db in $PGDBS; do
    psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  done
  redis-cli --scan --pattern "kp-bench*-$$:*" 2>/dev/null | xargs -r redis-cli del > /dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

. tests/load/lib.sh
evals() { redis-cli info commandstats 2>/dev/null | tr -d '\r' | awk -F'[=,:]' '/^cmdstat_eval/ {n += $3} END {print n + 0}'; }
# GETs and INCRBYs (a token quota's read and addition), the scripts' own included: Redis counts
# the commands a script calls as its own
gets() { redis-cli info commandstats 2>/dev/null | tr -d '\r' | awk -F'[=,:]' '/^cmdstat_(get|incrby):/ {n += $3} END {print n + 0}'; }
fetch() { # url: its body (curl, or python3 where there is no curl)
  if command -v curl >/dev/null; then curl -s "$1"; else
    python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())' "$1"
  fi
}
served() { fetch "${1%/v1}/metrics" | awk '/^keypool_requests_total/ {n += $2} END {print n + 0}'; }

"${UP_PIN[@]}" "$MOCK" mock --address 127.0.0.1:0 --workers "${UP_WORKERS:-1}" > "$WORK/mock.out" 2>&1 &
wait_line "$WORK/mock.out" "listening on"
UP=$(url_in "$WORK/mock.out")   # .../v1
TARGETS="direct"
declare -A URL PID
URL[direct]=$UP
if [ -n "${STREAMS:-}" ]; then
  "${UP_PIN[@]}" "$MOCK" mock --address 127.0.0.1:0 --workers "${UP_WORKERS:-1}" \
    --chunk-interval-ms "${STREAM_INTERVAL:-500}" > "$WORK/slow.out" 2>&1 &
  wait_line "$WORK/slow.out" "listening on"
  SLOW=$(url_in "$WORK/slow.out")
fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
hostport() { echo "$1" | sed -E 's#https?://([^/]+)/v1#\1#'; }
nginx_head() { # name workers: an nginx config's start, every path under $WORK (a packed
  # Debian nginx would otherwise use /var/lib/nginx and /var/log/nginx), up to inside `http {`
  cat <<NGX
worker_processes $2;
worker_rlimit_nofile 20000;
pid $WORK/$1.pid;
error_log $WORK/$1.err;
events { worker_connections 16384; }
http {
  access_log off;
  client_body_temp_path $WORK/$1-body;
  proxy_temp_path $WORK/$1-proxy;
  fastcgi_temp_path $WORK/$1-fastcgi;
  uwsgi_temp_path $WORK/$1-uwsgi;
  scgi_temp_path $WORK/$1-scgi;
NGX
}
# the mocks as the proxies' configs name them (UPHOST), over TLS with UPTLS=1
KUP=${UP/127.0.0.1/${UPHOST:-127.0.0.1}}
KSLOW=${SLOW:+${SLOW/127.0.0.1/${UPHOST:-127.0.0.1}}}
if [ "${UPTLS:-0}" = 1 ]; then
  # a TLS front of its own (nginx, one worker, beside the mocks) for each mock, its
  # certificate from a CA made here, which keypool trusts through SSL_CERT_FILE
  command -v openssl >/dev/null && command -v nginx >/dev/null || { echo "UPTLS=1 needs openssl and nginx" >&2; exit 1; }
  (cd "$WORK" && printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:%s\nbasicConstraints=CA:FALSE\n' "${UPHOST:-localhost}" > leaf.ext &&
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj "/CN=bench CA" -keyout ca.key -out ca.pem &&
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=localhost" -keyout tls.key -out tls.csr &&
    openssl x509 -req -days 2 -CAcreateserial -in tls.csr -CA ca.pem -CAkey ca.key -extfile leaf.ext -out tls.pem) > /dev/null 2>&1
  export SSL_CERT_FILE=$WORK/ca.pem
  TLS_PORT=$(free_port) TLS_PORT2=$(free_port)
  cat > "$WORK/tls-front.conf" <<NGX
$(nginx_head tls-front 1)
  ssl_certificate $WORK/tls.pem;
  ssl_certificate_key $WORK/tls.key;
  ssl_session_cache shared:front:10m;
  ssl_protocols TLSv1.2 TLSv1.3;
  upstream m1 { server $(hostport "$UP"); keepalive 128; }
  server {
    listen 127.0.0.1:$TLS_PORT ssl;
    location / { proxy_pass http://m1; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }
  }
$( [ -n "${STREAMS:-}" ] && echo "  upstream m2 { server $(hostport "$SLOW"); keepalive 128; }
  server {
    listen 127.0.0.1:$TLS_PORT2 ssl;
    location / { proxy_pass http://m2; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; }
  }" )
}
NGX
  "${UP_PIN[@]}" nginx -e "$WORK/tls-front.err" -c "$WORK/tls-front.conf" -g 'daemon off;' &
  sleep 0.5
  KUP="https://${UPHOST:-127.0.0.1}:$TLS_PORT/v1"
  KSLOW=${SLOW:+https://${UPHOST:-127.0.0.1}:$TLS_PORT2/v1}
  URL[direct]=$KUP
fi
rss_kb() { # pid: resident KB of it and its children (nginx's workers)
  local total=0 p
  for p in $1 $(pgrep -P "$1" 2>/dev/null); do
    total=$(( total + $(awk '/VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0) ))
  done
  echo "$total"
}
peak_while() { # pid file: the highest rss_kb, sampled every 100 ms until the file is removed
  local peak=0 now
  while [ -e "$2" ]; do now=$(rss_kb "$1"); [ "$now" -gt "$peak" ] && peak=$now; sleep 0.1; done
  echo "$peak"
}

if [ "${NGINX:-1}" = 1 ] && command -v nginx >/dev/null; then
  NG_PORT=$(free_port) NG_PORT2=$(free_port)
  UP_HOSTPORT=$(hostport "$KUP")
  # to a TLS front: verified as keypool verifies, sessions reused (nginx's default)
  UP_SCHEME=http NG_TLS=""
  if [ "${UPTLS:-0}" = 1 ]; then
    UP_SCHEME=https
    NG_TLS="proxy_ssl_verify on; proxy_ssl_trusted_certificate $WORK/ca.pem; proxy_ssl_name localhost;"
  fi
  cat > "$WORK/nginx.conf" <<NGX
$(nginx_head nginx "$WORKERS")
  upstream mock { server $UP_HOSTPORT; keepalive 128; }
  server {
    listen 127.0.0.1:$NG_PORT;
    location / { proxy_pass $UP_SCHEME://mock; proxy_http_version 1.1; proxy_set_header Connection ""; $NG_TLS }
  }
$( [ -n "${STREAMS:-}" ] && echo "  upstream slow { server $(hostport "$KSLOW"); keepalive 128; }
  server {
    listen 127.0.0.1:$NG_PORT2;
    location / { proxy_pass $UP_SCHEME://slow; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; $NG_TLS }
  }" )
}
NGX
  # -e: a packed Debian nginx would open its built-in /var/log/nginx/error.log first
  "${PROXY_PIN[@]}" nginx -e "$WORK/nginx.err" -c "$WORK/nginx.conf" -g 'daemon off;' &
  PID[nginx]=$!
  sleep 0.5
  URL[nginx]="http://127.0.0.1:$NG_PORT/v1"
  TARGETS="$TARGETS nginx"
fi

for store in $STORES; do
  cfg=${store#before-}
  case "$cfg" in
    none|rpm|gw|gw2|usd|tpm|sess|before) DB="dbtype: none" ;;
    sqlite) DB="dbtype: sqlite
dbaddr: $WORK/bench.sqlite" ;;
    postgres|pglocal)
      PGDB="kp_bench_${store}_$$"
      PGDBS="$PGDBS $PGDB"
      psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE $PGDB" >/dev/null
      if [ "$store" = postgres ]; then PGADDR="postgres://postgres@127.0.0.1:5432/$PGDB"
      else PGADDR="postgres://postgres@localhost/$PGDB?host=${PGSOCKET:-/var/run/postgresql}"; fi
      DB="dbtype: postgres
dbaddr: \"$PGADDR\"" ;;
    redis|redispick|gwredis|gw2redis|usdredis|quotaredis|tpmredis|sessredis) DB="dbtype: none
redis: {url: \"redis://127.0.0.1:6379/0\", prefix: \"kp-bench-$store-$$:\"}" ;;
    redislease|gwlease|gw2lease|picklease|usdlease|quotalease|tpmlease|sesslease) DB="dbtype: none
redis: {url: \"redis://127.0.0.1:6379/0\", prefix: \"kp-bench-$store-$$:\", lease: ${LEASE:-64}, lease_ms: 1000}" ;;
    frontends) DB="dbtype: sqlite
dbaddr: $WORK/cp.sqlite
admin: {token: bench-admin}" ;;
    *) echo "unknown store $store" >&2; exit 2 ;;
  esac
  LIMIT=""
  case "$cfg" in rpm|redis|redislease|frontends|gw*|sess*) LIMIT=", rpm: 100000000" ;; esac
  case "$cfg" in sess*) DB="$DB
affinity: {ttl: 600}" ;; esac
  case "$cfg" in tpm*) LIMIT=", rpm: 100000000, tpm: 100000000000" ;; esac
  case "$cfg" in
    gw2*) DB="$DB
rate_limits: [\"ingress:100000000/minute\", \"secret:100000000/minute\"]" ;;
    gw*) DB="$DB
rate_limits: [\"ingress:100000000/minute\"]" ;;
  esac
  case "$cfg" in usd*) DB="$DB
budget: {usd: 1000000, period: total}" ;; esac
  case "$cfg" in quota*) DB="$DB
token_quota: 100000000000" ;; esac
  cat > "$WORK/config-$store.yaml" <<YAML
address: 127.0.0.1:0
authorization: bench-token
$DB
upstreams:
  - {name: k1, sk: sk-bench-1, endpoint: "$KUP"$LIMIT}
  - {name: k2, sk: sk-bench-2, endpoint: "$KUP"$LIMIT}
  - {name: k3, sk: sk-bench-3, endpoint: "$KUP"$LIMIT}
YAML
  if [ "$store" = frontends ]; then
    RUST_LOG=warn "$BIN" admin --config "$WORK/config-$store.yaml" --admin-address 127.0.0.1:0 > "$WORK/cp.out" 2> "$WORK/cp.err" &
    PID[cp]=$!
    wait_line "$WORK/cp.out" "admin listening on"
    ADMIN=$(grep 'admin listening on' "$WORK/cp.out" | grep -o 'http://[^ ]*')
    for r in a b; do
      KEYPOOL_ADMIN_TOKEN=bench-admin RUST_LOG=warn "$BIN" frontend --admin "$ADMIN" --address 127.0.0.1:0 \
        --redis redis://127.0.0.1:6379/0 --redis-prefix "kp-bench-fe-$$:" --state-dir "$WORK/fe-$r" \
        > "$WORK/fe$r.out" 2> "$WORK/fe$r.err" &
      PID[fe$r]=$!
      wait_line "$WORK/fe$r.out" "listening on http.*/v1"
    done
    PID[$store]=${PID[fea]}
    URL[$store]=$(url_in "$WORK/fea.out")
    URL[feb]=$(url_in "$WORK/feb.out")
  else
    KBIN=$BIN
    [ "$store" = "$cfg" ] && [ "$store" != before ] || KBIN=${BASELINE:?STORES=before needs BASELINE=/path/to/keypool}
    RUST_LOG=warn "${PROXY_PIN[@]}" "$KBIN" serve --config "$WORK/config-$store.yaml" --admin-address 127.0.0.1:0 > "$WORK/kp-$store.out" 2> "$WORK/kp-$store.err" &
    PID[$store]=$!
    wait_line "$WORK/kp-$store.out" "listening on http.*/v1"
    URL[$store]=$(url_in "$WORK/kp-$store.out")
    sleep 0.2
    echo "keypool[$store]	$(rss_kb "${PID[$store]}")" >> "$WORK/idle.tsv"
  fi
  TARGETS="$TARGETS $store"
done

wrk_stats() { # wrk output file: req/s, p50 ms, p99 ms, non-2xx, socket errors (tab-separated)
  python3 - "$1" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
def ms(v, unit):
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
pct = {p: ms(v, u) for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)", text, re.M)}
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
sock = re.search(r"Socket errors: (.*)", text)
print(f"{rps}\t{pct.get('50', 0)}\t{pct.get('99', 0)}\t{errors.group(1) if errors else 0}\t{sock.group(1) if sock else ''}")
PY
}

declare -A EVALS GETS
in_redis() { # store: whether its config shares state in Redis (its round trips are counted)
  case "${1#before-}" in redis|redislease|redispick|picklease|frontends|gwredis|gwlease|gw2redis|gw2lease|usdredis|usdlease|quotaredis|quotalease|tpmredis|tpmlease|sessredis|sesslease) return 0 ;; *) return 1 ;; esac
}
run() { # target connections
  local name=$1 e0=0 g0=0 session=""
  [ "$name" = direct ] || [ "$name" = nginx ] || name="keypool[$1]"
  if in_redis "$1"; then e0=$(evals); g0=$(gets); fi
  case "${1#before-}" in sess*) session=bench-session ;; esac
  KP_SESSION=$session taskset -c "$WRK_CPUS" wrk -t"$WRK_THREADS" -c"$2" -d"${DURATION}s" --latency -s tests/load/chat.lua "${URL[$1]}/chat/completions" > "$WORK/run.txt"
  [ -z "${PID[$1]:-}" ] || echo "$name	$(rss_kb "${PID[$1]}")" >> "$WORK/rss-after.tsv"
  if in_redis "$1"; then
    EVALS[$1]=$(( ${EVALS[$1]:-0} + $(evals) - e0 )); GETS[$1]=$(( ${GETS[$1]:-0} + $(gets) - g0 ))
  fi
  echo "$name-$2	$(wrk_stats "$WORK/run.txt" | cut -f1-4)" >> "$WORK/results.tsv"
}

for t in $TARGETS; do
  taskset -c "$WRK_CPUS" wrk -t1 -c8 -d2s -s tests/load/chat.lua "${URL[$t]}/chat/completions" > /dev/null
done
declare -A SERVED0
for t in $STORES; do SERVED0[$t]=$(served "${URL[$t]}"); done
# each round starts one target later: back-to-back saturated runs slow the VM down (the third
# keypool of a round measured 5-8% below the second, whichever store it was), so every target
# takes every place in the order once per len(TARGETS) rounds
read -ra ORDER <<< "$TARGETS"
for r in $(seq 0 $((ROUNDS - 1))); do
  ROUND=("${ORDER[@]:r % ${#ORDER[@]}}" "${ORDER[@]:0:r % ${#ORDER[@]}}")
  for t in "${ROUND[@]}"; do run "$t" 64; done
  for t in "${ROUND[@]}"; do run "$t" 1; done
done

for store in $STORES; do
  echo "keypool[$store]	$(awk '/VmHWM/ {print $2}' "/proc/${PID[$store]}/status")" >> "$WORK/rss.tsv"
  if in_redis "$store"; then
    echo "$store: redis round trips per request: ${EVALS[$store]} scripts, ${GETS[$store]} GET/INCRBY (scripts' own included) / $(( $(served "${URL[$store]}") - ${SERVED0[$store]} )) requests" >> "$WORK/notes.txt"
  fi
  case "$store" in sqlite|postgres|pglocal)
    # nothing lost: every request's event is in the store (or still queued), none dropped;
    # the writer's last batch waits up to 200 ms for more events before it is written
    sleep 0.5
    fetch "${URL[$store]%/v1}/metrics" | awk -v s="$store" '
      /^keypool_requests_total/ {n += $2} /^keypool_usage_written_total/ {w = $2}
      /^keypool_usage_dropped_total/ {d = $2} /^keypool_usage_queue_depth/ {q = $2}
      END {printf "%s: %d requests answered, %d usage events written, %d queued, %d dropped\n", s, n, w, q, d}' >> "$WORK/notes.txt" ;;
  esac
done

if [[ " $STORES " == *" frontends "* ]]; then
  for _ in $(seq "$ROUNDS"); do
    taskset -c "$WRK_CPUS" wrk -t1 -c32 -d"${DURATION}s" -s tests/load/chat.lua "${URL[frontends]}/chat/completions" > "$WORK/fa.txt" &
    taskset -c "$WRK_CPUS" wrk -t1 -c32 -d"${DURATION}s" -s tests/load/chat.lua "${URL[feb]}/chat/completions" > "$WORK/fb.txt"
    wait %%
    echo "two frontends + redis, 2x32 conns: $(awk '/Requests\/sec/ {s += $2} END {printf "%.0f", s}' "$WORK/fa.txt" "$WORK/fb.txt") req/s" >> "$WORK/notes.txt"
  done
  SERVED=$(( $(served "${URL[frontends]}") + $(served "${URL[feb]}") ))
  # frontends flush their usage to the control plane on SIGTERM, then the control plane stops
  for p in fea feb cp; do kill -TERM "${PID[$p]}"; wait "${PID[$p]}" 2>/dev/null || true; done
  STORED=$(sqlite3 "$WORK/cp.sqlite" 'select count(*) from usage_events' 2>/dev/null || echo "?")
  echo "frontends: $SERVED requests served, $STORED usage events stored by the control plane" >> "$WORK/notes.txt"
fi

if [ "${REDIS2:-0}" = 1 ]; then
  sed "s/kp-bench-redis-$$:/kp-bench2-$$:/" "$WORK/config-redis.yaml" > "$WORK/config-redis2.yaml" 2>/dev/null || {
    echo "REDIS2=1 needs redis in STORES" >&2; exit 2; }
  for r in a b; do
    RUST_LOG=warn "$BIN" serve --config "$WORK/config-redis2.yaml" --admin-address 127.0.0.1:0 > "$WORK/kp2$r.out" 2> "$WORK/kp2$r.err" &
    wait_line "$WORK/kp2$r.out" "listening on http.*/v1"
  done
  KA=$(url_in "$WORK/kp2a.out"); KB=$(url_in "$WORK/kp2b.out")
  for _ in $(seq "$ROUNDS"); do
    taskset -c "$WRK_CPUS" wrk -t1 -c32 -d"${DURATION}s" -s tests/load/chat.lua "$KA/chat/completions" > "$WORK/r2a.txt" &
    taskset -c "$WRK_CPUS" wrk -t1 -c32 -d"${DURATION}s" -s tests/load/chat.lua "$KB/chat/completions" > "$WORK/r2b.txt"
    wait %%
    echo "two replicas + redis, 2x32 conns: $(awk '/Requests\/sec/ {s += $2} END {printf "%.0f", s}' "$WORK/r2a.txt" "$WORK/r2b.txt") req/s" >> "$WORK/notes.txt"
  done
fi

if [ "${OVERLOAD:-0}" = 1 ]; then
  cat > "$WORK/config-overload.yaml" <<YAML
address: 127.0.0.1:0
authorization: bench-token
dbtype: sqlite
dbaddr: $WORK/overload.sqlite
log: {queue_capacity: 64, on_overflow: spill, spill_path: "$WORK/overload.spill"}
upstreams:
  - {name: k1, sk: sk-bench-1, endpoint: "$KUP"}
YAML
  RUST_LOG=warn "$BIN" serve --config "$WORK/config-overload.yaml" --admin-address 127.0.0.1:0 > "$WORK/ov.out" 2> "$WORK/ov.err" &
  OV=$!
  wait_line "$WORK/ov.out" "listening on http.*/v1"
  OVURL=$(url_in "$WORK/ov.out")
  taskset -c "$WRK_CPUS" wrk -t1 -c64 -d"${DURATION}s" -s tests/load/chat.lua "$OVURL/chat/completions" > "$WORK/ov.txt"
  sleep 0.5   # requests still in flight when wrk stopped are answered too
  SPILLED=$(fetch "${OVURL%/v1}/metrics" | awk '/^keypool_usage_spilled_total/ {n += $2} END {print n + 0}')
  SERVED_OV=$(served "$OVURL")
  kill -TERM "$OV"; wait "$OV" 2>/dev/null || true
  ANSWERED=$(python3 -c 'import re,sys; t=open(sys.argv[1]).read(); n=int(re.search(r"(\d+) requests in", t).group(1)); e=re.search(r"Non-2xx or 3xx responses: (\d+)", t); print(n - (int(e.group(1)) if e else 0))' "$WORK/ov.txt")
  STORED=$(sqlite3 "$WORK/overload.sqlite" 'select count(*) from usage_events' 2>/dev/null || echo "?")
  echo "overload (queue_capacity 64, spill): $SERVED_OV requests answered by keypool ($ANSWERED 200s seen by wrk before it stopped), $STORED usage events stored after SIGTERM, $SPILLED spilled on the way" >> "$WORK/notes.txt"
fi

if [ -n "${MANY:-}" ]; then
  # one run per target at MANY connections: throughput, latency, RSS during it (sampled)
  for t in $TARGETS; do
    name=$t; [ "$t" = direct ] || [ "$t" = nginx ] || name="keypool[$t]"
    idle=0; [ -z "${PID[$t]:-}" ] || idle=$(rss_kb "${PID[$t]}")
    touch "$WORK/sampling"
    peak=0 sampler=""
    if [ -n "${PID[$t]:-}" ]; then peak_while "${PID[$t]}" "$WORK/sampling" > "$WORK/peak.txt" & sampler=$!; fi
    taskset -c "$WRK_CPUS" wrk -t"$WRK_THREADS" -c"$MANY" -d"${DURATION}s" --latency -s tests/load/chat.lua "${URL[$t]}/chat/completions" > "$WORK/many.txt" 2>&1 || true
    rm -f "$WORK/sampling"
    if [ -n "$sampler" ]; then wait "$sampler"; peak=$(cat "$WORK/peak.txt"); fi
    sleep 1; after=0 later=0; [ -z "${PID[$t]:-}" ] || after=$(rss_kb "${PID[$t]}")
    # 20 s after: past keypool's reaping of a burst's idle upstream connections (10 s idle)
    if [ -n "${PID[$t]:-}" ]; then sleep 19; later=$(rss_kb "${PID[$t]}"); fi
    IFS=$'\t' read -r rps p50 p99 errs sock <<< "$(wrk_stats "$WORK/many.txt")"
    python3 - "$name" "$MANY" "$idle" "$peak" "$after" "$rps" "$p50" "$p99" "$errs" "$sock" "$later" <<'PY' >> "$WORK/many.md"
import sys
name, conns, idle, peak, after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rps, p50, p99, errs, sock = float(sys.argv[6]), float(sys.argv[7]), float(sys.argv[8]), sys.argv[9], sys.argv[10]
later = int(sys.argv[11])
mem = f"{peak / 1024:.1f} MB ({(peak - idle) / conns:.1f} KB a connection) | {after / 1024:.1f} MB | {later / 1024:.1f} MB" if peak else " | |"
print(f"| {name} | {rps:,.0f} req/s | {p50:.2f} ms | {p99:.2f} ms | {errs} | {sock} | {mem} |")
PY
  done
fi

if [ -n "${STREAMS:-}" ]; then
  three_keys "$KSLOW" > "$WORK/config-streams.yaml"
  RUST_LOG=warn "${PROXY_PIN[@]}" "$BIN" serve --config "$WORK/config-streams.yaml" --admin-address 127.0.0.1:0 > "$WORK/kp-streams.out" 2> "$WORK/kp-streams.err" &
  PID[streams]=$!
  wait_line "$WORK/kp-streams.out" "listening on http.*/v1"
  declare -A SURL=([direct]=$SLOW [keypool]=$(url_in "$WORK/kp-streams.out"))
  declare -A SPID=([keypool]=${PID[streams]})
  STARGETS="direct keypool"
  if [ -n "${PID[nginx]:-}" ]; then SURL[nginx]="http://127.0.0.1:$NG_PORT2/v1"; SPID[nginx]=${PID[nginx]}; STARGETS="direct nginx keypool"; fi
  if [[ " $STORES " == *" before "* ]]; then
    RUST_LOG=warn "${PROXY_PIN[@]}" "$BASELINE" serve --config "$WORK/config-streams.yaml" --admin-address 127.0.0.1:0 > "$WORK/kpb-streams.out" 2> "$WORK/kpb-streams.err" &
    SPID[before]=$!
    wait_line "$WORK/kpb-streams.out" "listening on http.*/v1"
    SURL[before]=$(url_in "$WORK/kpb-streams.out")
    STARGETS="$STARGETS before"
  fi
  for t in $STARGETS; do
    idle=0; [ -z "${SPID[$t]:-}" ] || idle=$(rss_kb "${SPID[$t]}")
    touch "$WORK/sampling"
    peak=0 sampler=""
    if [ -n "${SPID[$t]:-}" ]; then peak_while "${SPID[$t]}" "$WORK/sampling" > "$WORK/peak.txt" & sampler=$!; fi
    taskset -c "$WRK_CPUS" "$STREAMS_BIN" "${SURL[$t]}/chat/completions" bench-token "$STREAMS" "${STREAM_INTERVAL:-500}" "${RAMP_MS:-2000}" > "$WORK/streams.json"
    rm -f "$WORK/sampling"
    if [ -n "$sampler" ]; then wait "$sampler"; peak=$(cat "$WORK/peak.txt"); fi
    python3 - "$WORK/streams.json" "$t" "$idle" "$peak" <<'PY' >> "$WORK/streams.md"
import json, sys
r = json.load(open(sys.argv[1]))
name, idle, peak = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
mem = f"{idle / 1024:.1f} / {peak / 1024:.1f} MB ({(peak - idle) / max(r['peak_open'], 1):.1f} KB a stream)" if peak else ""
print(f"| {name} | {r['done']:,} / {r['streams']:,} ({r['refused']} refused, {r['cut']} cut) | {r['peak_open']:,} | {r['ttfb_p50_us'] / 1000:.2f} / {r['ttfb_p99_us'] / 1000:.2f} ms | {r['late_p50_us'] / 1000:.2f} / {r['late_p99_us'] / 1000:.2f} ms | {mem} |")
PY
  done
fi

touch "$WORK/rss-after.tsv" "$WORK/idle.tsv"
python3 - "$WORK/results.tsv" "$WORK/rss.tsv" "$STORES" "$WORK/rss-after.tsv" "$WORK/idle.tsv" <<'PY'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().strip().splitlines()]
rss = dict(l.split("\t") for l in open(sys.argv[2]).read().strip().splitlines())
after = {}
for l in open(sys.argv[4]).read().strip().splitlines():
    k, v = l.split("\t")
    after.setdefault(k, []).append(int(v))
idle = dict(l.split("\t") for l in open(sys.argv[5]).read().strip().splitlines() if l)
def rss_after(name):
    v = after.get(name)
    return f"{statistics.median(v) / 1024:.1f} MB" if v else ""
def med(name, col):
    vals = [float(r[col]) for r in rows if r[0] == name]
    return statistics.median(vals) if vals else None
d64, d1p50, d1p99 = med("direct-64", 1), med("direct-1", 2), med("direct-1", 3)
print(f"| run (medians of rounds) | throughput, 64 conns | vs direct | p50, 1 conn | added p50 | p99, 1 conn | added p99 | RSS after a run | peak RSS |")
print("|---|---|---|---|---|---|---|---|---|")
print(f"| direct to the mock upstream | {d64:,.0f} req/s | 1.00x | {d1p50:.3f} ms | | {d1p99:.3f} ms | | | |")
n64 = med("nginx-64", 1)
if n64:
    n1p50, n1p99 = med("nginx-1", 2), med("nginx-1", 3)
    print(f"| nginx reverse proxy | {n64:,.0f} req/s | {n64 / d64:.2f}x | {n1p50:.3f} ms | +{n1p50 - d1p50:.3f} ms | {n1p99:.3f} ms | {n1p99 - d1p99:+.3f} ms | {rss_after('nginx')} | |")
base = None
for store in sys.argv[3].split():
    name = f"keypool[{store}]"
    k64, k1p50, k1p99 = med(name + "-64", 1), med(name + "-1", 2), med(name + "-1", 3)
    if store == "none":
        base = k64
    vs = f" ({k64 / base:.2f}x of none)" if base and store != "none" else ""
    mb = int(rss.get(name, "0")) / 1024
    print(f"| keypool, {store} | {k64:,.0f} req/s{vs} | {k64 / d64:.2f}x | {k1p50:.3f} ms | +{k1p50 - d1p50:.3f} ms | {k1p99:.3f} ms | {k1p99 - d1p99:+.3f} ms | {rss_after(name)} | {mb:.1f} MB |")
pairs = {}
for store in sys.argv[3].split():
    if store == "none":
        continue
    a = [float(r[1]) for r in rows if r[0] == f"keypool[{store}]-64"]
    b = [float(r[1]) for r in rows if r[0] == "keypool[none]-64"]
    if a and len(a) == len(b):
        pairs[store] = statistics.median(x / y for x, y in zip(a, b))
if pairs:
    print("\nmedian of per-round ratios to none (each round's runs are back to back): " +
          ", ".join(f"{k} {v:.2f}x" for k, v in pairs.items()))
print("\nper round (req/s at 64 conns):")
names = list(dict.fromkeys(r[0] for r in rows if r[0].endswith("-64")))
for n in names:
    print(f"  {n[:-3]:<20} " + "  ".join(f"{float(r[1]):>8,.0f}" for r in rows if r[0] == n))
if idle:
    print("\nidle RSS after start: " + ", ".join(f"{k} {int(v) / 1024:.1f} MB" for k, v in idle.items()))
errs = sum(int(r[4]) for r in rows)
print(f"\nnon-2xx responses: {errs}")
try:
    print(open(sys.argv[1].replace("results.tsv", "notes.txt")).read().strip())
except OSError:
    pass
PY
if [ -s "$WORK/many.md" ]; then
  echo; echo "| $MANY connections | throughput | p50 | p99 | non-2xx | socket errors | RSS during (memory a connection) | RSS 1 s after | 20 s after |"
  echo "|---|---|---|---|---|---|---|---|---|"; cat "$WORK/many.md"
fi
if [ -s "$WORK/streams.md" ]; then
  echo; echo "| $STREAMS streams, ${STREAM_INTERVAL:-500} ms apart | ended whole | most open at once | time to first event p50 / p99 | event lateness p50 / p99 | RSS idle / peak (a stream) |"
  echo "|---|---|---|---|---|---|"; cat "$WORK/streams.md"
fi
