#!/usr/bin/env bash
# Tracing overhead (docs/benchmarks.md): ShouldRateLimit throughput with TRACING_ENABLED=false,
# with tracing at TRACING_SAMPLING_RATE=1 (every call exported) and at 0 (spans made but
# none sampled), per backend. Release builds, loopback only; the three servers run side by
# side and their runs alternate, so drift on a noisy machine hits each alike; median of RUNS.
# Spans go over OTLP http/protobuf to a minimal Python sink answering 200 to every POST.
# Server CPU per call (utime + stime of the ratelimitd process around each run) is the figure
# least moved by the noise of a shared machine.
# Starts its own redis-server, sink and ratelimitd processes and stops them (by PID).
# Usage: bench/tracing.sh [RUNS] [REQUESTS]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
REQUESTS=${2:-100000}
source bench/lib.sh

write_unreachable_rule

start_redis

SPORT=$(free_port)
cat > "$WORK/sink.py" <<'PY'
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
python3 "$WORK/sink.py" "$SPORT" &
PIDS+=($!)
until python3 -c "import socket; socket.create_connection(('127.0.0.1',$SPORT))" 2>/dev/null; do sleep 0.05; done

OTLP=OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$SPORT"

TICK_US=$((1000000 / $(getconf CLK_TCK)))

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -A RPS P50 P99 CPU
echo "| backend | tracing | rps (median) | p50 µs | p99 µs | server CPU µs/call (median) | rps of each run |"
echo "|---|---|---|---|---|---|---|"
for backend in ${BACKENDS:-memory redis}; do
  extra=()
  [ "$backend" = redis ] && extra=(BACKEND_TYPE=redis REDIS_SOCKET_TYPE=tcp REDIS_URL="127.0.0.1:$RPORT")
  start_rl off "$OTLP" "${extra[@]}"
  start_rl on1 "$OTLP" "${extra[@]}" TRACING_ENABLED=true TRACING_SAMPLING_RATE=1
  start_rl on0 "$OTLP" "${extra[@]}" TRACING_ENABLED=true TRACING_SAMPLING_RATE=0
  RPS=([off]="" [on1]="" [on0]=""); P50=([off]="" [on1]="" [on0]=""); P99=([off]="" [on1]="" [on0]=""); CPU=([off]="" [on1]="" [on0]="")
  for _ in $(seq "$RUNS"); do
    for s in off on1 on0; do
      before=$(cpu_ticks "${SPID[$s]}")
      out=$("$LOAD" --target "${ADDR[$s]}" --domain bench --key k --keys 1 --requests "$REQUESTS" --concurrency 64 --connections 4)
      CPU[$s]+="$(( ($(cpu_ticks "${SPID[$s]}") - before) * TICK_US / REQUESTS )) "
      grep -q "errors=0" <<<"$out" || { echo "errors in run: $out" >&2; exit 1; }
      RPS[$s]+="$(sed -E 's/.* rps=([0-9]+).*/\1/' <<<"$out") "
      P50[$s]+="$(sed -E 's/.* p50_us=([0-9]+).*/\1/' <<<"$out") "
      P99[$s]+="$(sed -E 's/.* p99_us=([0-9]+).*/\1/' <<<"$out") "
    done
  done
  for s in off on1 on0; do
    label=$(case $s in off) echo "off";; on1) echo "on, sampling 1";; on0) echo "on, sampling 0";; esac)
    printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$backend" "$label" \
      "$(tr ' ' '\n' <<<"${RPS[$s]}" | grep . | median)" "$(tr ' ' '\n' <<<"${P50[$s]}" | grep . | median)" \
      "$(tr ' ' '\n' <<<"${P99[$s]}" | grep . | median)" "$(tr ' ' '\n' <<<"${CPU[$s]}" | grep . | median)" "${RPS[$s]% }"
  done
  # SIGTERM flushes; the SDK then logs how many spans a full queue dropped, if any.
  for p in "${PIDS[@]:2}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  PIDS=("${PIDS[@]:0:2}")
  grep -h -o "dropped_spans=[0-9]*" "$WORK"/on*.log | sed "s/^/$backend: /" >&2 || true
done
