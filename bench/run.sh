#!/usr/bin/env bash
# Reproduces docs/benchmarks.md: release builds, loopback only, each scenario run RUNS times,
# median reported. Starts its own redis-server and ratelimitd on free ports and stops them
# (by PID) at the end. Usage: bench/run.sh [RUNS] [REQUESTS]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
REQUESTS=${2:-100000}
source bench/lib.sh

write_unreachable_rule

start_redis

start_rl() { # $1 log name, rest: env assignments
  local name=$1; shift
  env -i PATH="$PATH" GRPC_HOST=127.0.0.1 GRPC_PORT=0 HOST=127.0.0.1 PORT=0 LOG_LEVEL=warn "$@" \
    "$BIN" serve --config "$WORK/bench.yaml" 2>"$WORK/$name.log" &
  PIDS+=($!)
  RL_PID=$!
  until grep -q "ratelimitd listening" "$WORK/$name.log"; do sleep 0.05; done
  RL_ADDR=$(grep "ratelimitd listening" "$WORK/$name.log" | sed -E 's/.*grpc=([^ ]+).*/\1/')
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

scenario() { # $1 label, $2 keys, $3 concurrency
  local rps=() p50=() p99=() rss
  for _ in $(seq "$RUNS"); do
    out=$("$LOAD" --target "$RL_ADDR" --domain bench --key k --keys "$2" --requests "$REQUESTS" --concurrency "$3" --connections 4)
    rps+=("$(sed -E 's/.* rps=([0-9]+).*/\1/' <<<"$out")")
    p50+=("$(sed -E 's/.* p50_us=([0-9]+).*/\1/' <<<"$out")")
    p99+=("$(sed -E 's/.* p99_us=([0-9]+).*/\1/' <<<"$out")")
    grep -q "errors=0" <<<"$out" || { echo "errors in run: $out" >&2; exit 1; }
  done
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$RL_PID/status")
  printf '| %s | %s | %s | %s | %s | %s |\n' "$1" "$3" \
    "$(printf '%s\n' "${rps[@]}" | median)" "$(printf '%s\n' "${p50[@]}" | median)" \
    "$(printf '%s\n' "${p99[@]}" | median)" "$((rss / 1024))"
}

echo "| scenario | concurrency | rps (median) | p50 µs | p99 µs | server RSS MiB |"
echo "|---|---|---|---|---|---|"
start_rl memory
scenario "memory, 1 hot key" 1 64
scenario "memory, 100k keys" 100000 64
kill "$RL_PID"
for pool in 1 10; do
  start_rl "redis$pool" BACKEND_TYPE=redis REDIS_SOCKET_TYPE=tcp REDIS_URL="127.0.0.1:$RPORT" REDIS_POOL_SIZE=$pool
  scenario "redis REDIS_POOL_SIZE=$pool, 1 hot key" 1 64
  [ "$pool" = 10 ] && scenario "redis REDIS_POOL_SIZE=$pool, 100k keys" 100000 64
  [ "$pool" = 10 ] && scenario "redis REDIS_POOL_SIZE=$pool, 1 hot key" 1 8
  kill "$RL_PID"
done
echo
echo "raw Redis ceiling on the same machine (redis-benchmark INCR, 64 clients, no pipelining):"
redis-benchmark -p "$RPORT" -t incr -c 64 -n "$REQUESTS" -q | tr '\r' '\n' | grep -E 'INCR' | tail -1
