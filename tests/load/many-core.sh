#!/usr/bin/env bash
# The many-core runs of issue 26 in one go (a program, not a test), with the folder
# tests/load/pack.sh made (PACK, default target/pack, or its .tar.gz): keypool and nginx with the same number
# of workers on the same pinned cores, wrk and the mock upstream on cores of their own, then a
# many-connection run and a streams run. Fits a lease of a few minutes (about 4 at the defaults).
# Every part of its output is also written to OUT (a folder, default: a new one in /tmp).
#
#   tests/load/many-core.sh                      # 16 cores: wrk 0-3, keypool/nginx 4-11, mock 12-15
#   WORKER_COUNTS="1 8" STREAMS=10000 MANY=2048 tests/load/many-core.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PACK=${PACK:-${CARGO_TARGET_DIR:-target}/pack}
# carried as the .tar.gz: unpacked beside it
[ -d "$PACK" ] || tar -C "$(dirname "$PACK")" -xzf "$PACK.tar.gz"
PACK=$(realpath "$PACK")
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PATH=$PACK/bin:$PATH
export NO_BUILD=1 KEYPOOL_BIN=$PACK/bin/keypool STREAMS_BIN=$PACK/bin/streams
ulimit -n "$(ulimit -Hn)"
CORES=$(nproc)
echo "cores: $CORES, open files: $(ulimit -n), kernel: $(uname -r)" | tee "$OUT/machine.txt"
# the Redis the benchmark's Redis modes use, when none runs
if ! redis-cli -p 6379 ping >/dev/null 2>&1; then
  redis-server --port 6379 --save '' --appendonly no --daemonize yes --logfile "$OUT/redis.log" >/dev/null
fi
export WRK_CPUS=${WRK_CPUS:-0-3} WRK_THREADS=${WRK_THREADS:-4}
export PROXY_CPUS=${PROXY_CPUS:-4-11} UP_CPUS=${UP_CPUS:-12-15} UP_WORKERS=${UP_WORKERS:-4}
export DURATION=${DURATION:-5} ROUNDS=${ROUNDS:-2}
COUNTS=${WORKER_COUNTS:-1 8} MANY_N=${MANY:-2048} STREAMS_N=${STREAMS:-10000}
unset MANY STREAMS
for w in $COUNTS; do
  # one worker: keypool and nginx pinned to one core of the proxy's
  cpus=$PROXY_CPUS
  [ "$w" = 1 ] && cpus=${PROXY_CPUS%%-*}
  echo "== $w worker(s) on cores $cpus" | tee -a "$OUT/bench.txt"
  WORKERS=$w PROXY_CPUS=$cpus STORES=${STORES:-none} tests/load/bench.sh 2>&1 | tee -a "$OUT/bench.txt"
done
echo "== many connections and streams, ${COUNTS##* } workers" | tee -a "$OUT/bench.txt"
WORKERS=${COUNTS##* } STORES=none ROUNDS=1 MANY=$MANY_N STREAMS=$STREAMS_N tests/load/bench.sh 2>&1 | tee -a "$OUT/bench.txt"
