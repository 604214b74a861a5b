#!/usr/bin/env bash
# The ghz hot-key scenario (bench/ghz/hot-key.json) with h2load, which Debian packages
# (nghttp2-client): gRPC is HTTP/2 POSTs of a length-prefixed protobuf, so h2load can send the
# same request. Starts its own ratelimitd (config/, in memory) on a free loopback port and stops
# it at the end. Usage: [BIN=path/to/ratelimitd] bench/h2load.sh [REQUESTS] [CLIENTS] [STREAMS_PER_CLIENT]
# (BIN compares another build in the same session; default: a release build of this tree).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-200000}; C=${2:-4}; M=${3:-16}
command -v h2load >/dev/null || { echo "needs h2load: apt-get install -y nghttp2-client" >&2; exit 1; }
[ -x .venv/bin/python ] || { echo "needs the test venv: ./scripts/test.sh" >&2; exit 1; }
if [ -z "${BIN:-}" ]; then cargo build --release --quiet --bin ratelimitd; BIN=target/release/ratelimitd; fi
WORK=$(mktemp -d); PID=
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$WORK"' EXIT

# The request of bench/ghz/hot-key.json, encoded with Envoy's own protos, in a gRPC frame
# (1 byte: not compressed, 4 bytes: big-endian length, then the message).
.venv/bin/python - "$WORK/body" <<'PY'
import struct, sys
from envoy.service.ratelimit.v3 import rls_pb2
req = rls_pb2.RateLimitRequest(domain="example")
d = req.descriptors.add(); e = d.entries.add(); e.key, e.value = "api_key", "hot"
msg = req.SerializeToString()
open(sys.argv[1], "wb").write(struct.pack(">BI", 0, len(msg)) + msg)
PY

env -i PATH="$PATH" GRPC_HOST=127.0.0.1 GRPC_PORT=0 HOST=127.0.0.1 PORT=0 DEBUG_HOST=127.0.0.1 \
  DEBUG_PORT=0 USE_STATSD=false "$BIN" serve --config config 2>"$WORK/log" &
PID=$!
until grep -qs "ratelimitd listening" "$WORK/log"; do sleep 0.05; done
ADDR=$(grep "ratelimitd listening" "$WORK/log" | sed -E 's/.*grpc=([^ ]+).*/\1/')
h2load -n "$N" -c "$C" -m "$M" -d "$WORK/body" \
  -H 'content-type: application/grpc' -H 'te: trailers' \
  "http://$ADDR/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit" \
  | grep -E '^(finished in|requests:|status codes:|time for request:)'
