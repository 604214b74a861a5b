#!/usr/bin/env bash
# The ghz hot-key scenario (bench/ghz/hot-key.json) with h2load, which Debian packages
# (nghttp2-client): gRPC is HTTP/2 POSTs of a length-prefixed protobuf, so h2load can send the
# same request. Starts its own ratelimitd (config/, in memory) on a free loopback port and stops
# it at the end. Usage: [BIN=path/to/ratelimitd] [STATSD=1] bench/h2load.sh [REQUESTS] [CLIENTS] [STREAMS_PER_CLIENT]
# (BIN compares another build in the same session; default: a release build of this tree).
# STATSD=1 runs ratelimitd with USE_STATSD=true (the reference's default), sending over UDP every
# second to a loopback receiver this script starts, which only counts and drops the datagrams.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-200000}; C=${2:-4}; M=${3:-16}
command -v h2load >/dev/null || { echo "needs h2load: apt-get install -y nghttp2-client" >&2; exit 1; }
[ -x .venv/bin/python ] || { echo "needs the test venv: ./scripts/test.sh" >&2; exit 1; }
if [ -z "${BIN:-}" ]; then cargo build --release --quiet --bin ratelimitd; BIN=target/release/ratelimitd; fi
WORK=$(mktemp -d); PID=; SPID=
# (each kill may find its process gone already; under set -e that must not end the trap early)
trap '[ -z "$PID" ] || kill "$PID" 2>/dev/null || true; [ -z "$SPID" ] || kill "$SPID" 2>/dev/null || true
      rm -rf "$WORK"' EXIT

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

STATS=(USE_STATSD=false)
if [ -n "${STATSD:-}" ]; then
  # The StatsD receiver: a free loopback UDP port (written to statsd.port), datagrams counted
  # into statsd.count and dropped; it stops after an hour at the latest, or at exit (trap).
  .venv/bin/python - "$WORK/statsd" <<'PY' &
import os, signal, socket, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); s.settimeout(0.5)
def put(name, text):
    open(sys.argv[1] + ".tmp", "w").write(text); os.replace(sys.argv[1] + ".tmp", sys.argv[1] + name)
put(".port", str(s.getsockname()[1]))
n = size = 0; last = 0.0; end = time.monotonic() + 3600
while time.monotonic() < end:
    try: size += len(s.recv(65535)); n += 1
    except socket.timeout: pass
    if time.monotonic() - last >= 0.5: put(".count", f"{n} datagrams, {size} bytes"); last = time.monotonic()
PY
  SPID=$!
  for _ in $(seq 200); do [ -s "$WORK/statsd.port" ] && break; sleep 0.05; done
  [ -s "$WORK/statsd.port" ] || { echo "the StatsD receiver did not start" >&2; exit 1; }
  STATS=(USE_STATSD=true STATSD_PROTOCOL=udp STATSD_HOST=127.0.0.1
         STATSD_PORT="$(cat "$WORK/statsd.port")" STATS_FLUSH_INTERVAL=1s)
fi

env -i PATH="$PATH" GRPC_HOST=127.0.0.1 GRPC_PORT=0 HOST=127.0.0.1 PORT=0 DEBUG_HOST=127.0.0.1 \
  DEBUG_PORT=0 "${STATS[@]}" "$BIN" serve --config config 2>"$WORK/log" &
PID=$!
for _ in $(seq 600); do
  grep -qs "ratelimitd listening" "$WORK/log" && break
  kill -0 "$PID" 2>/dev/null || break
  sleep 0.05
done
grep -qs "ratelimitd listening" "$WORK/log" || { echo "ratelimitd did not start:" >&2; cat "$WORK/log" >&2; exit 1; }
ADDR=$(grep "ratelimitd listening" "$WORK/log" | sed -E 's/.*grpc=([^ ]+).*/\1/')
h2load -n "$N" -c "$C" -m "$M" -d "$WORK/body" \
  -H 'content-type: application/grpc' -H 'te: trailers' \
  "http://$ADDR/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit" \
  | grep -E '^(finished in|requests:|status codes:|time for request:)'
if [ -n "${STATSD:-}" ]; then
  sleep 1.5   # one more flush
  echo "statsd received: $(cat "$WORK/statsd.count" 2>/dev/null || echo nothing)"
fi
