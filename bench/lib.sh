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
