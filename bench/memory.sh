#!/usr/bin/env bash
# The in-memory backend's figures in docs/benchmarks.md and the MEMORY_MAX_COUNTERS figures:
# throughput and server RSS for one hot key and for 100k keys (the bench/run.sh memory
# scenarios, RUNS runs each, medians), then RSS after DISTINCT distinct day-window keys, once
# per cap given. Everything on loopback, free ports, USE_STATSD=false; every run is bounded by
# its request count and by loadgen's --max-seconds; servers are stopped by PID.
# Usage: bench/memory.sh [RUNS] [DISTINCT] [CAP...]   (BIN=path/to/ratelimitd to compare builds;
# DISTINCT=0 skips the distinct-key part). "bytes per counter" is the RSS the distinct keys
# added (after WARMUP calls on one key, default 200000) over ratelimitd_memory_counters.
#   bench/memory.sh 3 2000000 default 100000
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
DISTINCT=${2:-2000000}
shift $(( $# < 2 ? $# : 2 ))
CAPS=("$@")
[ ${#CAPS[@]} -gt 0 ] || CAPS=(default)
cargo build --release --quiet --bin ratelimitd --example loadgen
BIN=${BIN:-target/release/ratelimitd}
LOAD=target/release/examples/loadgen
WORK=$(mktemp -d)
RL_PID=
cleanup() { [ -n "$RL_PID" ] && kill "$RL_PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

cat > "$WORK/second.yaml" <<'YAML'
domain: bench
descriptors:
  - key: k
    rate_limit: {unit: second, requests_per_unit: 4000000000}
YAML
cat > "$WORK/day.yaml" <<'YAML'
domain: bench
descriptors:
  - key: k
    rate_limit: {unit: day, requests_per_unit: 4000000000}
YAML

start_rl() { # $1 rules file, rest: env assignments
  local rules=$1; shift
  : > "$WORK/rl.log"
  env -i PATH="$PATH" GRPC_HOST=127.0.0.1 GRPC_PORT=0 HOST=127.0.0.1 PORT=0 DEBUG_HOST=127.0.0.1 \
    DEBUG_PORT=0 USE_STATSD=false LOG_LEVEL=warn "$@" "$BIN" serve --config "$rules" 2>"$WORK/rl.log" &
  RL_PID=$!
  for _ in $(seq 400); do grep -q "ratelimitd listening" "$WORK/rl.log" && break; sleep 0.05; done
  RL_ADDR=$(grep "ratelimitd listening" "$WORK/rl.log" | sed -E 's/.*grpc=([^ ]+).*/\1/')
  RL_HTTP=$(grep "ratelimitd listening" "$WORK/rl.log" | sed -E 's/.* http=([^ ]+).*/\1/')
}
stop_rl() { kill "$RL_PID"; wait "$RL_PID" 2>/dev/null || true; RL_PID=; }
rss_mib() { awk -v k="$1" '$1 == k":" {printf "%d", $2 / 1024}' "/proc/$RL_PID/status"; }
rss_kib() { awk -v k="$1" '$1 == k":" {printf "%d", $2}' "/proc/$RL_PID/status"; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
load() { # $1 keys, $2 requests, $3 max seconds
  "$LOAD" --target "$RL_ADDR" --domain bench --key k --keys "$1" --requests "$2" \
    --concurrency 64 --connections 4 --max-seconds "$3"
}

echo "binary: $BIN"
echo "| scenario | rps per run | rps (median) | p99 µs (median) | server RSS MiB |"
echo "|---|---|---|---|---|"
start_rl "$WORK/second.yaml"
for scenario in "1 hot key:1" "100k keys:100000"; do
  label=${scenario%%:*}; keys=${scenario##*:}
  rps=(); p99=()
  for _ in $(seq "$RUNS"); do
    out=$(load "$keys" 100000 60)
    grep -q "errors=0" <<<"$out" || { echo "errors in run: $out" >&2; exit 1; }
    rps+=("$(sed -E 's/.* rps=([0-9]+).*/\1/' <<<"$out")")
    p99+=("$(sed -E 's/.* p99_us=([0-9]+).*/\1/' <<<"$out")")
  done
  printf '| memory, %s | %s | %s | %s | %s |\n' "$label" "${rps[*]}" \
    "$(printf '%s\n' "${rps[@]}" | median)" "$(printf '%s\n' "${p99[@]}" | median)" "$(rss_mib VmRSS)"
done
stop_rl

[ "$DISTINCT" -gt 0 ] || exit 0
echo
echo "| $DISTINCT distinct day-window keys | rps | server RSS KiB before | after (peak) | bytes per counter | ratelimitd_memory_counters | ratelimitd_memory_evictions_total |"
echo "|---|---|---|---|---|---|---|"
for cap in "${CAPS[@]}"; do
  if [ "$cap" = default ]; then start_rl "$WORK/day.yaml"; else start_rl "$WORK/day.yaml" MEMORY_MAX_COUNTERS="$cap"; fi
  # RSS after WARMUP calls on one key at the same concurrency (connections, buffers, malloc
  # arenas and metrics warmed up by traffic, one counter held), so the difference below is
  # what the counters cost. WARMUP=1 measures from a server that answered one call.
  out=$(load 1 "${WARMUP:-200000}" 60)
  grep -q "errors=0" <<<"$out" || { echo "errors in run: $out" >&2; exit 1; }
  before=$(rss_kib VmRSS)
  out=$(load "$DISTINCT" "$DISTINCT" 180)
  grep -q "errors=0" <<<"$out" || { echo "errors in run: $out" >&2; exit 1; }
  metrics=$(curl -s "http://$RL_HTTP/metrics")
  gauge=$(awk '$1 == "ratelimitd_memory_counters" {print $2}' <<<"$metrics")
  evicted=$(awk '$1 == "ratelimitd_memory_evictions_total" {print $2}' <<<"$metrics")
  after=$(rss_kib VmRSS)
  per=n/a
  [ -n "$gauge" ] && [ "${gauge%.*}" -gt 0 ] && per=$(( (after - before) * 1024 / ${gauge%.*} ))
  printf '| MEMORY_MAX_COUNTERS=%s (%s requests sent) | %s | %s | %s (%s) | %s | %s | %s |\n' "$cap" \
    "$(sed -E 's/requests=([0-9]+).*/\1/' <<<"$out")" "$(sed -E 's/.* rps=([0-9]+).*/\1/' <<<"$out")" \
    "$before" "$after" "$(rss_kib VmHWM)" "$per" "${gauge:-n/a}" "${evicted:-n/a}"
  stop_rl
done
