#!/usr/bin/env bash
# Per-rule metrics cardinality under hostile traffic: KEYS calls, each with a new descriptor key
# and a `limit` override (every call a new stats key), then /metrics size, scrape time and the
# server's RSS. Starts its own ratelimitd (in memory, StatsD on over UDP to a port nobody
# listens on, so the StatsD map fills too) on free loopback ports and stops it (by PID) at the
# end. Usage: bench/metrics-cardinality.sh [KEYS] [BINARY]  (BINARY: default a release build of
# this tree; pass another build to compare).
set -euo pipefail
cd "$(dirname "$0")/.."
KEYS=${1:-100000}
cargo build --release --quiet --example loadgen
if [ -z "${2:-}" ]; then cargo build --release --quiet --bin ratelimitd; fi
BIN=${2:-target/release/ratelimitd}
LOAD=target/release/examples/loadgen
WORK=$(mktemp -d); PID=
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$WORK"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cat > "$WORK/bench.yaml" <<'YAML'
domain: bench
descriptors:
  - key: k
    rate_limit: {unit: second, requests_per_unit: 4000000000}
YAML

: > "$WORK/log"
env -i PATH="$PATH" GRPC_HOST=127.0.0.1 GRPC_PORT=0 HOST=127.0.0.1 PORT=0 DEBUG_HOST=127.0.0.1 \
  DEBUG_PORT=0 LOG_LEVEL=warn USE_STATSD=true STATSD_PROTOCOL=udp STATSD_HOST=127.0.0.1 \
  STATSD_PORT="$(free_port)" "$BIN" serve --config "$WORK/bench.yaml" 2>"$WORK/log" &
PID=$!
until grep -q "ratelimitd listening" "$WORK/log"; do sleep 0.05; done
GRPC=$(grep "ratelimitd listening" "$WORK/log" | sed -E 's/.*grpc=([^ ]+).*/\1/')
HTTP=$(grep "ratelimitd listening" "$WORK/log" | sed -E 's/.* http=([^ ]+).*/\1/')
rss() { awk '/VmRSS/ {print int($2 / 1024) " MiB"}' "/proc/$PID/status"; }

echo "binary: $BIN   idle RSS: $(rss)"
"$LOAD" --target "$GRPC" --domain bench --key o --keys "$KEYS" --requests "$KEYS" \
  --concurrency 50 --connections 4 --vary-key --override-limit 1000000
echo "RSS after $KEYS keys: $(rss)"
for i in 1 2 3; do
  curl -s -o "$WORK/metrics" -w "scrape $i: %{size_download} bytes in %{time_total} s" \
    "http://$HTTP/metrics"
  echo ", $(grep -c '^ratelimit_service_rate_limit_total_hits{' "$WORK/metrics") total_hits series"
done
echo "RSS after the scrapes: $(rss)"
