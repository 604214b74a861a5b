#!/usr/bin/env bash
# LOCAL_CACHE_SIZE_IN_BYTES measured in one session (docs/benchmarks.md, "Local over-limit
# cache"). Release builds, loopback only.
#
# Starts its own redis-server and two ratelimitd on it (cache off, cache on at 1 MiB) on free
# 127.0.0.1 ports. Two rules: `over` (1 per hour, so after the first call every call is over
# its limit: the traffic the cache is for) and `under` (never reached: every call is counted
# in Redis, so the cache can only cost its lookup). Each run measures both rules on both
# servers, alternating which server goes first, and reads each server's CPU time and Redis's
# (/proc/PID/stat) and EVALSHA calls (INFO commandstats) around every measurement. Ratios
# are cache-on over cache-off in the same run; medians and ranges are reported.
# It stops only what it started (by PID) at exit.
#
# Usage: [CONCURRENCY=64] bench/local_cache.sh [RUNS] [REQUESTS]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
REQUESTS=${2:-40000}
CONCURRENCY=${CONCURRENCY:-64}
source bench/lib.sh

cat >"$WORK/bench.yaml" <<'YAML'
domain: bench
descriptors:
  - key: over
    rate_limit: {unit: hour, requests_per_unit: 1}
  - key: under
    rate_limit: {unit: second, requests_per_unit: 4000000000}
YAML

start_redis

REDIS=(BACKEND_TYPE=redis REDIS_SOCKET_TYPE=tcp REDIS_URL="127.0.0.1:$RPORT")
start_rl off "${REDIS[@]}" LOCAL_CACHE_SIZE_IN_BYTES=0
start_rl on "${REDIS[@]}" LOCAL_CACHE_SIZE_IN_BYTES=1048576

load() { # $1 server, $2 rule, $3 requests
  "$LOAD" --target "${ADDR[$1]}" --domain bench --key "$2" --keys 1 --requests "$3" \
    --concurrency "$CONCURRENCY" --connections 4 --max-seconds 30
}

echo "load average at start: $(cat /proc/loadavg)" >&2
for s in off on; do for r in over under; do load "$s" "$r" $((REQUESTS / 4)) >/dev/null; done; done

RAW=$WORK/raw.tsv
printf 'run\tserver\trule\trps\tp50_us\tp99_us\tserver_cpu_us\tredis_cpu_us\tevalsha_per_call\tloadavg1\n' >"$RAW"
TICK_US=$((1000000 / $(getconf CLK_TCK)))
for run in $(seq "$RUNS"); do
  if ((run % 2)); then order=(off on); else order=(on off); fi
  for s in "${order[@]}"; do
    for r in over under; do
      redis-cli -p "$RPORT" config resetstat >/dev/null
      s0=$(cpu_ticks "${SPID[$s]}"); d0=$(cpu_ticks "$REDIS_PID")
      out=$(load "$s" "$r" "$REQUESTS")
      s1=$(cpu_ticks "${SPID[$s]}"); d1=$(cpu_ticks "$REDIS_PID")
      grep -q " errors=0 " <<<"$out" || { echo "$s $r: errors: $out" >&2; exit 1; }
      if [ "$r" = under ]; then
        grep -q " over_limit=0 " <<<"$out" || { echo "$s $r: refusals: $out" >&2; exit 1; }
      fi
      calls=$(sed -E 's/^requests=([0-9]+).*/\1/' <<<"$out")
      stats=$(redis-cli -p "$RPORT" info commandstats | tr -d '\r' | grep '^cmdstat_evalsha:' || true)
      ec=0
      [ -z "$stats" ] || ec=$(sed -E 's/.*[:,]calls=([0-9]+).*/\1/' <<<"$stats")
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$run" "$s" "$r" "$(field rps "$out")" \
        "$(field p50_us "$out")" "$(field p99_us "$out")" \
        "$(awk -v t=$((s1 - s0)) -v u="$TICK_US" -v c="$calls" 'BEGIN{printf "%.2f", t*u/c}')" \
        "$(awk -v t=$((d1 - d0)) -v u="$TICK_US" -v c="$calls" 'BEGIN{printf "%.2f", t*u/c}')" \
        "$(awk -v e="$ec" -v c="$calls" 'BEGIN{printf "%.4f", e/c}')" \
        "$(cut -d' ' -f1 /proc/loadavg)" >>"$RAW"
    done
  done
  echo "run $run of $RUNS done, load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
done

python3 - "$RAW" "$RUNS runs x $REQUESTS calls per rule and server, $CONCURRENCY in flight" <<'PY'
import csv, statistics, sys
raw, what = sys.argv[1:]
rows = list(csv.DictReader(open(raw), delimiter="\t"))
by = {(r["run"], r["server"], r["rule"]): r for r in rows}
med = statistics.median
def cell(v, f): return f"{f(med(v))} ({f(min(v))}–{f(max(v))})"
i0 = lambda x: f"{x:,.0f}"; f1 = lambda x: f"{x:.1f}"; f2 = lambda x: f"{x:.2f}"; f3 = lambda x: f"{x:.3f}"
print(f"{what}; median (range over runs); ratios are cache on ÷ cache off in the same run")
print()
print("| rule | cache | rps | ÷ off | p50 µs | ÷ off | p99 µs | ÷ off | ratelimitd CPU µs/call | ÷ off | redis CPU µs/call | EVALSHA per call |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for rule in ("over", "under"):
    for s in ("off", "on"):
        mine = [r for r in rows if r["server"] == s and r["rule"] == rule]
        cols = []
        for k, f in (("rps", i0), ("p50_us", i0), ("p99_us", i0), ("server_cpu_us", f1)):
            v = [float(r[k]) for r in mine]
            ratio = [float(r[k]) / float(by[(r["run"], "off", rule)][k]) for r in mine
                     if float(by[(r["run"], "off", rule)][k]) > 0]
            cols += [cell(v, f), "1" if s == "off" else cell(ratio, f2)]
        cols += [cell([float(r["redis_cpu_us"]) for r in mine], f1),
                 cell([float(r["evalsha_per_call"]) for r in mine], f3)]
        print(f"| {rule} | {s} | " + " | ".join(cols) + " |")
la = [float(r["loadavg1"]) for r in rows]
print()
print(f"1-minute load average during the runs: {min(la):.2f}–{max(la):.2f}")
PY
