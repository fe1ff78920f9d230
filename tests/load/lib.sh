# Helpers the load scripts share (sourced, not run).

wait_line() { # file pattern [its stderr]: waits up to 10 s for the pattern, else shows both
  for _ in $(seq 100); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "timed out waiting for $2 in $1" >&2; cat "$1" ${3:-} >&2; exit 1
}
url_in() { grep -v -e 'admin listening' -e 'console at' "$1" | grep -o 'http://[^ ]*' | head -1; }  # the API, not the admin API or the console
three_keys() { # endpoint [per-key fields, e.g. ", rpm: 100"] [top-level lines]: a config, dbtype none, three keys on it
  printf 'address: 127.0.0.1:0\nauthorization: bench-token\ndbtype: none\n%s\nupstreams:\n' "${3:-}"
  for k in 1 2 3; do printf '  - {name: k%s, sk: sk-bench-%s, endpoint: "%s"%s}\n' "$k" "$k" "$1" "${2:-}"; done
}
