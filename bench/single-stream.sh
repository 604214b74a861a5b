#!/usr/bin/env bash
# One call at a time (h2load -c 1 -m 1), as a lightly loaded Envoy sends them: the case where
# Nagle's algorithm and delayed ACKs turn a 0.1 ms call into a 40 ms one. For each backend
# (memory, and a redis-server started here on a free loopback port) and for a 1-descriptor and
# a 100-descriptor request, prints h2load's min/mean/max call time.
# Usage: bench/single-stream.sh [RATELIMITD_BINARY] [REQUESTS]   (default: a release build, 20000)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-}; N=${2:-20000}
command -v h2load >/dev/null || { echo "needs h2load: apt-get install -y nghttp2-client" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "needs redis-server: apt-get install -y redis-server" >&2; exit 1; }
if [ -z "$BIN" ]; then cargo build --release --quiet --bin ratelimitd; BIN=target/release/ratelimitd; fi
WORK=$(mktemp -d); PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# RateLimitRequest{domain: "bench", descriptors: [{entries: [{key: "k", value: "vI"}]} x D]},
# protobuf-encoded by hand (field 1 domain, field 2 descriptors; Entry: key 1, value 2) in a
# gRPC frame (1 byte: not compressed, 4 bytes: big-endian length, then the message).
for d in 1 100; do
  python3 - "$WORK/body$d" "$d" <<'PY'
import struct, sys
def ld(field, data): 
    n = len(data); out = bytes([field << 3 | 2])
    while True:
        b = n & 0x7F; n >>= 7
        out += bytes([b | (0x80 if n else 0)])
        if not n: return out + data
msg = ld(1, b"bench")
for i in range(int(sys.argv[2])):
    entry = ld(1, b"k") + ld(2, b"v%d" % i)
    msg += ld(2, ld(1, entry))
open(sys.argv[1], "wb").write(struct.pack(">BI", 0, len(msg)) + msg)
PY
done
mkdir -p "$WORK/config"
cat >"$WORK/config/bench.yaml" <<'YAML'
domain: bench
descriptors:
  - key: k
    rate_limit: {unit: hour, requests_per_unit: 1000000000}
YAML

RPORT=$(free_port)
redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
PIDS+=($!)
until redis-cli -p "$RPORT" ping >/dev/null 2>&1; do sleep 0.05; done

for backend in memory redis; do
  extra=(); [ "$backend" = redis ] && extra=(BACKEND_TYPE=redis REDIS_SOCKET_TYPE=tcp REDIS_URL=127.0.0.1:$RPORT)
  env -i PATH="$PATH" GRPC_HOST=127.0.0.1 GRPC_PORT=0 HOST=127.0.0.1 PORT=0 DEBUG_HOST=127.0.0.1 \
    DEBUG_PORT=0 USE_STATSD=false "${extra[@]}" "$BIN" serve --config "$WORK/config" 2>"$WORK/log.$backend" &
  PID=$!; PIDS+=($PID)
  until grep -qs "ratelimitd listening" "$WORK/log.$backend"; do sleep 0.05; done
  ADDR=$(grep "ratelimitd listening" "$WORK/log.$backend" | sed -E 's/.*grpc=([^ ]+).*/\1/')
  for d in 1 100; do
    printf '%-7s %3s descriptor(s): ' "$backend" "$d"
    h2load -n "$N" -c 1 -m 1 -d "$WORK/body$d" \
      -H 'content-type: application/grpc' -H 'te: trailers' \
      "http://$ADDR/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit" \
      | awk '/^status codes:/ {codes=$0} /^time for request:/ {print "min " $4 "  max " $5 "  mean " $6 "  sd " $7} END {print "        " codes}'
  done
  kill "$PID"; wait "$PID" 2>/dev/null || true
done
