#!/usr/bin/env bash
# The cost of each counting algorithm against fixed_window, measured in one session
# (docs/benchmarks.md, "Algorithms against fixed_window"). Release builds, loopback only.
#
# Starts its own redis-server and two ratelimitd (one in memory, one on that Redis) on free
# 127.0.0.1 ports, with one rule per algorithm plus two three-limit rules, all at limits no
# answer reaches, so every call does the full work (match, count, answer). After one short
# warm-up per rule, each run measures every rule on both backends, rotating the rules' order
# from run to run (and alternating which backend goes first), so drift in the machine's load
# falls on all rules alike. Each rule's figures are divided by fixed_window's from the same run
# and backend; the medians and ranges of those ratios are reported, with the raw medians.
# Besides throughput and latency (from examples/loadgen.rs), it reads each server's CPU time
# (/proc/PID/stat) around every run, and for Redis the script's own cost from
# `INFO commandstats` (usec_per_call of EVALSHA, reset before each run).
# It stops only what it started (by PID) at exit.
#
# Usage: [CONCURRENCY=64] [KEYS=1] [OUT=file.tsv] bench/algorithms.sh [RUNS] [REQUESTS]
#   RUNS      measured runs (default 5); REQUESTS calls per rule, backend and run (default 40000)
#   KEYS      distinct descriptor values per rule (1 = one hot key)
#   OUT       also keep the raw per-run figures (tab-separated)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
REQUESTS=${2:-40000}
CONCURRENCY=${CONCURRENCY:-64}
KEYS=${KEYS:-1}
summarize() { # $1 raw file, $2 what was measured
python3 - "$1" "$2" <<'PY'
import csv, statistics, sys
raw, what = sys.argv[1:]
rows = list(csv.DictReader(open(raw), delimiter="\t"))
rules = [r for r in ("fixed", "sliding", "token", "three_fixed", "three_mixed") if any(x["rule"] == r for x in rows)]
by = {(r["run"], r["backend"], r["rule"]): r for r in rows}
med = statistics.median
def rng(v, f): return f"{f(min(v))}–{f(max(v))}"
def cell(vals, f): return f"{f(med(vals))} ({rng(vals, f)})"
i0 = lambda x: f"{x:,.0f}"; f1 = lambda x: f"{x:.1f}"; f2 = lambda x: f"{x:.2f}"
print(f"{what}; median (range over runs); ratios are against fixed_window in the same run and backend")
print()
print("| backend | rule | rps | rps ÷ fixed | p50 µs | p50 ÷ fixed | p99 µs | p99 ÷ fixed "
      "| server CPU µs/call | ÷ fixed | EVALSHA µs/call | ÷ fixed | redis-server CPU µs/call | ÷ fixed |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for b in ("memory", "redis"):
    for rule in rules:
        mine = [r for r in rows if r["backend"] == b and r["rule"] == rule]
        cols = []
        for k, f in (("rps", i0), ("p50_us", i0), ("p99_us", i0), ("server_cpu_us_per_call", f1)):
            v = [float(r[k]) for r in mine]
            ratio = [float(r[k]) / float(by[(r["run"], b, "fixed")][k]) for r in mine
                     if float(by[(r["run"], b, "fixed")][k]) > 0]
            cols += [cell(v, f), "1" if rule == "fixed" else cell(ratio, f2)]
        for k, f in (("evalsha_us_per_call", f1), ("redis_cpu_us_per_call", f1)):
            if b != "redis":
                cols += ["–", "–"]
                continue
            v = [float(r[k]) for r in mine]
            ratio = [float(r[k]) / float(by[(r["run"], b, "fixed")][k]) for r in mine]
            cols += [cell(v, f), "1" if rule == "fixed" else cell(ratio, f2)]
        print(f"| {b} | {rule} | " + " | ".join(cols) + " |")
la = [float(r["loadavg1"]) for r in rows]
print()
print(f"1-minute load average during the runs: {min(la):.2f}–{max(la):.2f}")
PY
}
if [ -n "${SUMMARIZE:-}" ]; then summarize "$SUMMARIZE" "from $SUMMARIZE"; exit; fi
source bench/lib.sh

# One rule per algorithm, and two with three limits (bench/rules/algorithms.yaml).
cp bench/rules/algorithms.yaml "$WORK/bench.yaml"
RULES=(fixed sliding token three_fixed three_mixed)
"$BIN" check-config --config "$WORK/bench.yaml" >/dev/null

start_redis

start_rl memory BACKEND_TYPE=memory
start_rl redis BACKEND_TYPE=redis REDIS_SOCKET_TYPE=tcp REDIS_URL="127.0.0.1:$RPORT"

load() { # $1 backend, $2 rule, $3 requests
  "$LOAD" --target "${ADDR[$1]}" --domain bench --key "$2" --keys "$KEYS" --requests "$3" \
    --concurrency "$CONCURRENCY" --connections 4 --max-seconds 30
}

echo "load average at start: $(cat /proc/loadavg)" >&2
for b in memory redis; do for r in "${RULES[@]}"; do load "$b" "$r" $((REQUESTS / 4)) >/dev/null; done; done

RAW=$WORK/raw.tsv
printf 'run\tbackend\trule\trps\tp50_us\tp99_us\tserver_cpu_us_per_call\tredis_cpu_us_per_call\tevalsha_us_per_call\tevalsha_calls\tloadavg1\n' >"$RAW"
TICK_US=$((1000000 / $(getconf CLK_TCK)))
n=${#RULES[@]}
for run in $(seq "$RUNS"); do
  if ((run % 2)); then order=(memory redis); else order=(redis memory); fi
  for b in "${order[@]}"; do
    for i in $(seq 0 $((n - 1))); do
      r=${RULES[$(((i + run) % n))]}
      redis-cli -p "$RPORT" config resetstat >/dev/null
      s0=$(cpu_ticks "${SPID[$b]}"); d0=$(cpu_ticks "$REDIS_PID")
      out=$(load "$b" "$r" "$REQUESTS")
      s1=$(cpu_ticks "${SPID[$b]}"); d1=$(cpu_ticks "$REDIS_PID")
      grep -q " over_limit=0 errors=0 " <<<"$out" || { echo "$b $r: not every call OK: $out" >&2; exit 1; }
      calls=$(sed -E 's/^requests=([0-9]+).*/\1/' <<<"$out")
      stats=$(redis-cli -p "$RPORT" info commandstats | tr -d '\r' | grep '^cmdstat_evalsha:' || true)
      eu=-; ec=0
      if [ -n "$stats" ]; then
        eu=$(sed -E 's/.*[:,]usec_per_call=([0-9.]+).*/\1/' <<<"$stats")
        ec=$(sed -E 's/.*[:,]calls=([0-9]+).*/\1/' <<<"$stats")
      fi
      [ "$b" = memory ] || [ "$ec" = "$calls" ] || echo "note: $r: $ec EVALSHA for $calls calls" >&2
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$run" "$b" "$r" "$(field rps "$out")" \
        "$(field p50_us "$out")" "$(field p99_us "$out")" \
        "$(awk -v t=$((s1 - s0)) -v u="$TICK_US" -v c="$calls" 'BEGIN{printf "%.2f", t*u/c}')" \
        "$(awk -v t=$((d1 - d0)) -v u="$TICK_US" -v c="$calls" 'BEGIN{printf "%.2f", t*u/c}')" \
        "$eu" "$ec" "$(cut -d' ' -f1 /proc/loadavg)" >>"$RAW"
    done
  done
  echo "run $run of $RUNS done, load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
done
echo "load average at end: $(cat /proc/loadavg)" >&2
[ -z "${OUT:-}" ] || cp "$RAW" "$OUT"

summarize "$RAW" "$RUNS runs x $REQUESTS calls per rule and backend, $CONCURRENCY in flight, $KEYS key(s)"
