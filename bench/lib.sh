# Shared by the bench scripts (sourced, not run): the release build, a work directory, the
# processes a script starts (stopped by PID at exit, and only those), free loopback ports, a
# throwaway redis-server, and reading CPU time and loadgen's figures.
#
# After sourcing: BIN (ratelimitd; another build when BIN is set), LOAD (examples/loadgen),
# WORK (a temporary directory, removed at exit) and PIDS (append every process started; each
# is stopped at exit).

cargo build --release --quiet --bin ratelimitd --example loadgen
BIN=${BIN:-target/release/ratelimitd}
LOAD=target/release/examples/loadgen
WORK=$(mktemp -d)
PIDS=()

# Each kill may find its process gone already; under set -e that must not end the trap early.
bench_cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
  rm -rf "$WORK"
}
trap bench_cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# A redis-server on a free loopback port, nothing saved: sets RPORT and REDIS_PID.
start_redis() {
  RPORT=$(free_port)
  redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" >/dev/null &
  REDIS_PID=$!
  PIDS+=("$REDIS_PID")
  for _ in $(seq 200); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
  redis-cli -p "$RPORT" ping >/dev/null || { echo "redis-server did not start" >&2; exit 1; }
}

# utime + stime of process $1, in clock ticks.
cpu_ticks() { sed -E 's/.*\) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }

# CPU µs per call from cpu_ticks before ($1) and after ($2) $3 calls, two decimals.
cpu_us_per_call() {
  awk -v a="$1" -v b="$2" -v n="$3" -v t="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", (b-a)*1e6/t/n}'
}

# The value of loadgen's `$1=` field in its output line $2.
field() { sed -E "s/(^|.* )$1=([0-9.]+).*/\2/" <<<"$2"; }

# Waits until log $1 has the server's "listening grpc=" line (ratelimitd's or the no-op's)
# while process $2 runs, checking $3 times every $4 s, then prints its gRPC address; fails
# when the process ends or the time runs out first.
listening_addr() {
  local log=$1 pid=$2 tries=$3 pause=$4
  for _ in $(seq "$tries"); do
    grep -qs "listening grpc=" "$log" && break
    kill -0 "$pid" 2>/dev/null || break
    sleep "$pause"
  done
  grep -m1 "listening grpc=" "$log" 2>/dev/null | sed -E 's/.*grpc=([^ ]+).*/\1/' | grep .
}

# ratelimitd on $WORK/bench.yaml, every listener on a free loopback port, with the env
# assignments given after its name $1; waits until it listens (or fails loudly) and sets
# ADDR[$1] (its gRPC address) and SPID[$1] (its PID).
declare -A ADDR SPID
start_rl() {
  local name=$1; shift
  rm -f "$WORK/$name.log" # a previous run's log would read as ready
  env -i PATH="$PATH" GRPC_HOST=127.0.0.1 GRPC_PORT=0 HOST=127.0.0.1 PORT=0 DEBUG_HOST=127.0.0.1 \
    DEBUG_PORT=0 USE_STATSD=false LOG_LEVEL=warn "$@" \
    "$BIN" serve --config "$WORK/bench.yaml" 2>"$WORK/$name.log" &
  local pid=$!
  PIDS+=("$pid")
  ADDR[$name]=$(listening_addr "$WORK/$name.log" "$pid" 600 0.05) ||
    { echo "ratelimitd ($name) did not start:" >&2; cat "$WORK/$name.log" >&2; exit 1; }
  SPID[$name]=$pid
}

# $WORK/bench.yaml: domain `bench`, one rule `k` at 4,000,000,000 per second, a limit no
# answer reaches, so every call does the full work (match, count, answer).
write_unreachable_rule() {
  cat >"$WORK/bench.yaml" <<'YAML'
domain: bench
descriptors:
  - key: k
    rate_limit: {unit: second, requests_per_unit: 4000000000}
YAML
}

# $1: a gRPC-framed RateLimitRequest{domain: "bench", descriptors: [{entries: [{key: "k",
# value: "vI"}]} for I in 0..$2]}, protobuf-encoded by hand (field 1 domain, field 2
# descriptors; Entry: key 1, value 2) behind the gRPC frame header (1 byte: not compressed,
# 4 bytes: big-endian length), for h2load's -d.
write_grpc_body() {
  python3 - "$1" "$2" <<'PY'
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
}

# h2load: $1 calls over $2 connections with $3 streams each to gRPC address $4, body file $5,
# and a grpc-timeout of $6 ms when given (as Envoy sends).
# Prints "rps=… mean_us=… min_us=… max_us=… failed=…" (h2load's own times, in µs); fails
# when h2load is missing.
h2load_calls() {
  command -v h2load >/dev/null || { echo "needs h2load: apt-get install -y nghttp2-client" >&2; return 1; }
  local timeout=()
  [ -n "${6:-}" ] && timeout=(-H "grpc-timeout: ${6}m")
  h2load -n "$1" -c "$2" -m "$3" -d "$5" -H 'content-type: application/grpc' -H 'te: trailers' \
    "${timeout[@]}" \
    "http://$4/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit" | awk '
    function us(v) {
      if (v ~ /us$/) return v + 0
      if (v ~ /ms$/) return v * 1000
      return v * 1000000
    }
    /^finished in/ { rps = $4 }
    /^requests:/ { failed = $10 + $12 }
    /^time for request:/ { min = us($4); max = us($5); mean = us($6) }
    END { printf "rps=%s mean_us=%.1f min_us=%.1f max_us=%.1f failed=%d\n", rps, mean, min, max, failed }'
}
