#!/usr/bin/env bash
# Latency and start-up against the number of rules loaded (issue 14: "latency flat within noise
# from 10 to 100k rules loaded"; docs/benchmarks.md, "Rule count and latency"). Release builds,
# loopback only, memory backend.
#
# Writes one rule file per N (default 10, 1,000, 10,000 and 100,000 rules in domain `bench`),
# a mix repeated in groups of ten rules: four `api_key` values (fixed window, sliding window,
# token bucket), a `tenant` value with three nested `path` rules, a key-only `route_<g>` with
# two limits, and an `org` value whose nested level has a `share_threshold` wildcard (`u*`)
# and a key-only `user`. Every file passes `check-config`. Two rules are measured, both at
# 4,000,000,000 per second (never reached, so every call does the full work):
#   top   `api_key=v0`, the file's first rule (one level)
#   deep  `tenant=t<last group>` > `path=v0`, among the file's last rules (two levels)
# Each is an exact `key_value` hit at every level, so the matcher does one hash lookup per level
# (src/matcher.rs); no level holds more than one wildcard, so no wildcard list grows with N.
#
# Each run starts one ratelimitd per N (in a rotated order), and records its start-up (wall
# time from exec to "ratelimitd listening", polled every 10 ms, and its CPU time by then) and
# its RSS (VmRSS once listening). Then, for each target and in a rotated order of N, it
# measures one call at a time (1 connection x 1 stream, SINGLE calls: mean, p50, p99) and a
# closed loop (4 connections x 16 streams, REQUESTS calls: rps), then stops the four servers.
# Figures are divided by N=10's from the same run; medians and ranges over runs are printed.
# It stops only what it started (by PID).
#
# Usage: [NS="10 1000 10000 100000"] [SINGLE=20000] [OUT=raw.tsv] bench/rules.sh [RUNS] [REQUESTS]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
REQUESTS=${2:-50000}
SINGLE=${SINGLE:-20000}
read -r -a NS <<<"${NS:-10 1000 10000 100000}"
source bench/lib.sh
TCK=$(getconf CLK_TCK)

# gen_rules N FILE: N rules (rounded down to whole groups of ten, at least one group).
gen_rules() {
  python3 - "$1" >"$2" <<'PY'
import sys
groups = max(1, int(sys.argv[1]) // 10)
top = "{unit: second, requests_per_unit: 4000000000}"
out = ["domain: bench", "descriptors:"]
for g in range(groups):
    for j in range(4):
        a = g * 4 + j
        lim = (top if a == 0 else
               "{unit: minute, requests_per_unit: 600, algorithm: sliding_window}" if j == 1 else
               "{unit: minute, requests_per_unit: 100, algorithm: token_bucket, burst: 20}" if j == 2 else
               "{unit: hour, requests_per_unit: 10000}")
        out += ["  - key: api_key", f"    value: v{a}", f"    rate_limit: {lim}"]
    out += ["  - key: tenant", f"    value: t{g}", "    descriptors:"]
    for p in range(3):
        lim = top if p == 0 else "{unit: second, requests_per_unit: 50}"
        out += ["      - key: path", f"        value: v{p}", f"        rate_limit: {lim}"]
    out += [f"  - key: route_{g}", "    rate_limits:",
            "      - {unit: second, requests_per_unit: 100}",
            "      - {unit: hour, requests_per_unit: 100000}"]
    out += ["  - key: org", f"    value: o{g}", "    descriptors:",
            "      - key: user", '        value: "u*"', "        share_threshold: true",
            "        rate_limit: {unit: minute, requests_per_unit: 1000}",
            "      - key: user", "        rate_limit: {unit: minute, requests_per_unit: 60}"]
print("\n".join(out))
PY
}

declare -A RULES LAST
for n in "${NS[@]}"; do
  mkdir -p "$WORK/n$n"
  gen_rules "$n" "$WORK/n$n/bench.yaml"
  "$BIN" check-config --config "$WORK/n$n/bench.yaml" >"$WORK/n$n/check.txt"
  RULES[$n]=$(grep -c 'shadow_mode:' "$WORK/n$n/check.txt" || true)
  LAST[$n]=$(($(grep -c '^    value: t' "$WORK/n$n/bench.yaml") - 1))
  # Both targets must match their rule (an unmatched descriptor is OK too, and would cost less).
  "$BIN" explain --config "$WORK/n$n/bench.yaml" --domain bench api_key=v0 >"$WORK/n$n/top.txt"
  "$BIN" explain --config "$WORK/n$n/bench.yaml" --domain bench "tenant=t${LAST[$n]}" path=v0 \
    >"$WORK/n$n/deep.txt"
  for t in top deep; do
    grep -q '4000000000 per second' "$WORK/n$n/$t.txt" ||
      { echo "N=$n: $t does not match its rule:" >&2; cat "$WORK/n$n/$t.txt" >&2; exit 1; }
  done
  echo "N=$n: ${RULES[$n]} rules, $(wc -c <"$WORK/n$n/bench.yaml") bytes" >&2
done

# start_n N: ratelimitd on N's rules; sets SPID[N], ADDR[N], START_MS[N], START_CPU_MS[N], RSS_KB[N].
declare -A START_MS START_CPU_MS RSS_KB
start_n() {
  local n=$1 log=$WORK/n$1/serve.log t0 pid
  rm -f "$log"
  t0=$(date +%s%N)
  env -i PATH="$PATH" GRPC_HOST=127.0.0.1 GRPC_PORT=0 HOST=127.0.0.1 PORT=0 DEBUG_HOST=127.0.0.1 \
    DEBUG_PORT=0 USE_STATSD=false LOG_LEVEL=info BACKEND_TYPE=memory \
    "$BIN" serve --config "$WORK/n$n/bench.yaml" 2>"$log" &
  pid=$!
  PIDS+=("$pid")
  ADDR[$n]=$(listening_addr "$log" "$pid" 6000 0.01) ||
    { echo "ratelimitd (N=$n) did not start:" >&2; cat "$log" >&2; exit 1; }
  START_MS[$n]=$((($(date +%s%N) - t0) / 1000000))
  START_CPU_MS[$n]=$(($(cpu_ticks "$pid") * 1000 / TCK))
  RSS_KB[$n]=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
  SPID[$n]=$pid
}

stop_n() {
  kill "${SPID[$1]}" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "${SPID[$1]}" 2>/dev/null || break; sleep 0.05; done
}

# target_args N TARGET: loadgen's descriptor for the target rule.
target_args() {
  case $2 in
    top) echo "--key api_key" ;;
    deep) echo "--parent tenant=t${LAST[$1]} --key path" ;;
  esac
}

RAW=$WORK/raw.tsv
printf 'run\tn\trules\ttarget\tstart_ms\tstart_cpu_ms\trss_kb\tmean_us\tp50_us\tp99_us\trps\tloadavg1\n' >"$RAW"
echo "load average at start: $(cat /proc/loadavg)" >&2
k=${#NS[@]}
for run in $(seq "$RUNS"); do
  order=()
  for i in $(seq 0 $((k - 1))); do order+=("${NS[$(((i + run - 1) % k))]}"); done
  for n in "${order[@]}"; do start_n "$n"; done
  # Warm-up: connections, the counters, the allocator.
  for n in "${order[@]}"; do
    for t in top deep; do
      # shellcheck disable=SC2046
      "$LOAD" --target "${ADDR[$n]}" --domain bench $(target_args "$n" $t) --requests 5000 >/dev/null
    done
  done
  for t in top deep; do
    for n in "${order[@]}"; do
      # shellcheck disable=SC2046
      single=$("$LOAD" --target "${ADDR[$n]}" --domain bench $(target_args "$n" $t) \
        --connections 1 --streams 1 --requests "$SINGLE")
      # shellcheck disable=SC2046
      loop=$("$LOAD" --target "${ADDR[$n]}" --domain bench $(target_args "$n" $t) \
        --connections 4 --streams 16 --requests "$REQUESTS")
      for out in "$single" "$loop"; do
        grep -q " over_limit=0 errors=0 " <<<"$out" || { echo "N=$n $t: not every call OK: $out" >&2; exit 1; }
      done
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$run" "$n" "${RULES[$n]}" "$t" \
        "${START_MS[$n]}" "${START_CPU_MS[$n]}" "${RSS_KB[$n]}" "$(field mean_us "$single")" \
        "$(field p50_us "$single")" "$(field p99_us "$single")" "$(field rps "$loop")" \
        "$(cut -d' ' -f1 /proc/loadavg)" >>"$RAW"
    done
  done
  for n in "${order[@]}"; do stop_n "$n"; done
  echo "run $run of $RUNS done, load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
done
echo "load average at end: $(cat /proc/loadavg)" >&2
[ -z "${OUT:-}" ] || cp "$RAW" "$OUT"

python3 - "$RAW" "$RUNS" "$SINGLE" "$REQUESTS" <<'PY'
import csv, statistics, sys
raw, runs, single, requests = sys.argv[1:]
rows = list(csv.DictReader(open(raw), delimiter="\t"))
med = statistics.median
ns = sorted({int(r["n"]) for r in rows})
base = ns[0]
def by(n, t, run):
    return next(r for r in rows if int(r["n"]) == n and r["target"] == t and r["run"] == run)
def cell(v, f):
    return f"{f(med(v))} ({f(min(v))}–{f(max(v))})"
i0 = lambda x: f"{x:,.0f}"; f1 = lambda x: f"{x:.1f}"; f2 = lambda x: f"{x:.2f}"
runs_seen = sorted({r["run"] for r in rows})
print(f"{runs} runs; median (range over runs); ratios ÷ N={base} are taken inside each run")
print()
print(f"Start-up and memory (one ratelimitd per N, memory backend)")
print()
print("| N rules | start-up ms (exec to listening) | CPU ms by then | RSS MiB once listening | RSS ÷ N=%d |" % base)
print("|---|---|---|---|---|")
for n in ns:
    mine = [by(n, "top", run) for run in runs_seen]
    st = [float(r["start_ms"]) for r in mine]
    cpu = [float(r["start_cpu_ms"]) for r in mine]
    rss = [float(r["rss_kb"]) / 1024 for r in mine]
    rr = [float(by(n, "top", run)["rss_kb"]) / float(by(base, "top", run)["rss_kb"]) for run in runs_seen]
    print(f"| {int(mine[0]['rules']):,} | {cell(st, i0)} | {cell(cpu, i0)} | {cell(rss, f1)} | {cell(rr, f2)} |")
print()
print(f"Latency: one call at a time ({single} calls, 1 connection x 1 stream); "
      f"throughput: closed loop, 4 connections x 16 streams, {requests} calls")
print()
print(f"| target | N rules | mean µs | ÷ N={base} | p50 µs | ÷ N={base} | p99 µs | ÷ N={base} | rps | ÷ N={base} |")
print("|---|---|---|---|---|---|---|---|---|---|")
for t in ("top", "deep"):
    for n in ns:
        cols = []
        for k, f in (("mean_us", f1), ("p50_us", i0), ("p99_us", i0), ("rps", i0)):
            v = [float(by(n, t, run)[k]) for run in runs_seen]
            ratio = [float(by(n, t, run)[k]) / float(by(base, t, run)[k]) for run in runs_seen]
            cols += [cell(v, f), "1" if n == base else cell(ratio, f2)]
        print(f"| {t} | {int(by(n, t, runs_seen[0])['rules']):,} | " + " | ".join(cols) + " |")
la = [float(r["loadavg1"]) for r in rows]
print()
print(f"1-minute load average during the runs: {min(la):.2f}–{max(la):.2f}")
PY
