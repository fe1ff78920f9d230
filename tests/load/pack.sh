#!/usr/bin/env bash
# Packs what tests/load/bench.sh needs into one folder, for a machine that has no Rust, wrk,
# nginx or Redis (the many-core machine lent for a few minutes): keypool and the streams client
# built here (release, stripped), and this machine's wrk, nginx and Redis with the shared
# libraries they load (glibc's own excepted: the other machine has its own, as new or newer),
# each started by a wrapper that points the loader at them (so the other machine's own
# programs, python3 among them, keep their libraries). Then the folder as one .tar.gz beside it
# (~20 MB), the form to carry. A program, not a test.
#
#   tests/load/pack.sh                  # target/pack and target/pack.tar.gz (ignored by git)
#   tests/load/pack.sh /tmp/pack
#
# There, from the repository's root, tests/load/many-core.sh unpacks it and runs the benchmark.
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-${CARGO_TARGET_DIR:-target}/pack}
T=${CARGO_TARGET_DIR:-target}
for tool in wrk nginx redis-server; do
  command -v "$tool" >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk nginx redis-server; break; }
done
cargo build --release -q -p keypool-gateway
cargo build --release -q -p keypool-e2e --example streams
rm -rf "$DIR" "$DIR.tar.gz"
mkdir -p "$DIR/bin" "$DIR/lib" "$DIR/libexec"
strip -o "$DIR/bin/keypool" "$T/release/keypool"
strip -o "$DIR/bin/streams" "$T/release/examples/streams"
for tool in wrk nginx redis-server redis-cli; do
  cp "$(command -v "$tool")" "$DIR/libexec/"
  # every library it loads but glibc's (libc, libm, the loader and their kin)
  ldd "$(command -v "$tool")" | awk '/=> \// {print $3}' \
    | grep -Ev '/(libc|libm|libdl|libpthread|librt|libresolv|ld-linux[^/]*)\.so' \
    | while read -r lib; do cp -nL "$lib" "$DIR/lib/"; done
  # exec keeps the pid, so the benchmark's $! and RSS still name the program itself
  printf '#!/bin/sh\nd=$(dirname "$(readlink -f "$0")")/..\nLD_LIBRARY_PATH="$d/lib" exec "$d/libexec/%s" "$@"\n' "$tool" > "$DIR/bin/$tool"
  chmod +x "$DIR/bin/$tool"
done
tar -C "$(dirname "$DIR")" -czf "$DIR.tar.gz" "$(basename "$DIR")"
du -sh "$DIR" "$DIR.tar.gz" | awk '{print "packed " $1 " in " $2}'
