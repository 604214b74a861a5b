#!/usr/bin/env bash
# One call at a time (h2load -c 1 -m 1), as a lightly loaded Envoy sends them: the case where
# Nagle's algorithm and delayed ACKs turn a 0.1 ms call into a 40 ms one. For each backend
# (memory, and a redis-server started here on a free loopback port) and for a 1-descriptor and
# a 100-descriptor request, prints h2load's min/mean/max call time.
# Usage: bench/single-stream.sh [RATELIMITD_BINARY] [REQUESTS]   (default: a release build, 20000)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${1:-}" ] && BIN=$1
N=${2:-20000}
command -v h2load >/dev/null || { echo "needs h2load: apt-get install -y nghttp2-client" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "needs redis-server: apt-get install -y redis-server" >&2; exit 1; }
source bench/lib.sh
for d in 1 100; do write_grpc_body "$WORK/body$d" "$d"; done
write_unreachable_rule
start_redis
start_rl memory
start_rl redis BACKEND_TYPE=redis REDIS_SOCKET_TYPE=tcp REDIS_URL="127.0.0.1:$RPORT"
for backend in memory redis; do
  for d in 1 100; do
    printf '%-7s %3s descriptor(s): %s\n' "$backend" "$d" \
      "$(h2load_calls "$N" 1 1 "${ADDR[$backend]}" "$WORK/body$d")"
  done
done
