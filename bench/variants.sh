#!/usr/bin/env bash
# Builds or settings of ratelimitd side by side in one session, in memory and on Redis,
# rotating the variants' order from run to run. Scenarios (SCENARIOS, all by default):
#   throughput  loadgen, closed loop, CONNS x STREAMS, one hot key: rps, p50, p99
#   fixed_rate  loadgen, open loop at RATE: server CPU per call (on Redis, redis-server's too)
#   h2load      h2load, closed loop, H2_CLIENTS x H2_STREAMS (16 x 16, issue 14's set-up):
#               rps and server CPU per call, the steadiest CPU figure on this machine
# Ratios are against the first variant in the same run. Release builds, loopback only;
# everything is started here on free ports and stopped by PID.
#
# Usage: [CONNS=4] [STREAMS=16] [RATE=8000] [RATE_REQUESTS=40000] [BACKENDS="memory redis"] \
#   [SCENARIOS="throughput fixed_rate h2load"] [H2_CLIENTS=16] [H2_STREAMS=16] \
#   bench/variants.sh RUNS REQUESTS 'label|binary|ENV=v ENV=v[|MS]' ...
# MS, when given, is a grpc-timeout in milliseconds that the variant's calls carry (loadgen
# --grpc-timeout, h2load's header), as Envoy's filter sends its timeout: the server's deadline
# path, e.g. 'no header|target/release/ratelimitd|' 'grpc-timeout 20 ms|target/release/ratelimitd||20'.
# e.g. the runtime settings of one build:
#   bench/variants.sh 5 100000 'default|target/release/ratelimitd|' \
#     'one worker|target/release/ratelimitd|WORKER_THREADS=1' \
#     'current thread|target/release/ratelimitd|RUNTIME_FLAVOR=current_thread'
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=$1
REQUESTS=$2
shift 2
VARIANTS=("$@")
CONNS=${CONNS:-4}
STREAMS=${STREAMS:-16}
RATE=${RATE:-8000}
RATE_REQUESTS=${RATE_REQUESTS:-40000}
BACKENDS=${BACKENDS:-memory redis}
SCENARIOS=${SCENARIOS:-throughput fixed_rate h2load}
source bench/lib.sh
write_unreachable_rule
start_redis

declare -A LABEL TIMEOUT
for i in "${!VARIANTS[@]}"; do
  IFS='|' read -r label bin envs timeout <<<"${VARIANTS[$i]}"
  LABEL[$i]=$label
  TIMEOUT[$i]=$timeout
  for b in $BACKENDS; do
    extra=()
    [ "$b" = redis ] && extra=(BACKEND_TYPE=redis REDIS_SOCKET_TYPE=tcp REDIS_URL="127.0.0.1:$RPORT")
    # shellcheck disable=SC2086
    BIN=$bin start_rl "v$i-$b" "${extra[@]}" $envs
  done
done

RAW=$WORK/raw.tsv
printf 'run\tvariant\tbackend\tscenario\trps\tp50_us\tp99_us\tcpu_us\tredis_cpu_us\n' >"$RAW"
measure() { # run, variant index, backend, scenario, loadgen args...
  local run=$1 i=$2 b=$3 sc=$4; shift 4
  local name="v$i-$b" c0 c1 r0 r1 out n timeout=()
  [ -n "${TIMEOUT[$i]}" ] && timeout=(--grpc-timeout "${TIMEOUT[$i]}")
  c0=$(cpu_ticks "${SPID[$name]}")
  r0=$(cpu_ticks "$REDIS_PID")
  out=$("$LOAD" --target "${ADDR[$name]}" --domain bench --key k "${timeout[@]}" "$@")
  c1=$(cpu_ticks "${SPID[$name]}")
  r1=$(cpu_ticks "$REDIS_PID")
  n=$(field requests "$out")
  [ "$(field errors "$out")" = 0 ] || { echo "errors ($name): $out" >&2; exit 1; }
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$run" "$i" "$b" "$sc" "$(field rps "$out")" \
    "$(field p50_us "$out")" "$(field p99_us "$out")" \
    "$(cpu_us_per_call "$c0" "$c1" "$n")" "$(cpu_us_per_call "$r0" "$r1" "$n")" >>"$RAW"
}
# h2load, closed loop: rps and the server's (and Redis's) CPU per call.
measure_h2load() { # run, variant index, backend
  local run=$1 i=$2 b=$3
  local name="v$i-$b" c0 c1 r0 r1 out
  c0=$(cpu_ticks "${SPID[$name]}")
  r0=$(cpu_ticks "$REDIS_PID")
  out=$(h2load_calls "$REQUESTS" "${H2_CLIENTS:-16}" "${H2_STREAMS:-16}" "${ADDR[$name]}" "$WORK/body1" "${TIMEOUT[$i]}")
  c1=$(cpu_ticks "${SPID[$name]}")
  r1=$(cpu_ticks "$REDIS_PID")
  [ "$(field failed "$out")" = 0 ] || { echo "h2load failures ($name): $out" >&2; exit 1; }
  printf '%s\t%s\t%s\th2load\t%s\t\t\t%s\t%s\n' "$run" "$i" "$b" "$(field rps "$out")" \
    "$(cpu_us_per_call "$c0" "$c1" "$REQUESTS")" "$(cpu_us_per_call "$r0" "$r1" "$REQUESTS")" >>"$RAW"
}
write_grpc_body "$WORK/body1" 1
for i in "${!VARIANTS[@]}"; do for b in $BACKENDS; do
  "$LOAD" --target "${ADDR[v$i-$b]}" --domain bench --key k --requests 20000 >/dev/null
done; done
n=${#VARIANTS[@]}
for run in $(seq "$RUNS"); do
  for b in $BACKENDS; do
    for k in $(seq 0 $((n - 1))); do
      i=$(((k + run - 1) % n))
      for sc in $SCENARIOS; do
        case $sc in
          throughput) measure "$run" "$i" "$b" throughput --connections "$CONNS" --streams "$STREAMS" --requests "$REQUESTS" ;;
          fixed_rate) measure "$run" "$i" "$b" fixed_rate --connections "$CONNS" --streams "$STREAMS" --rate "$RATE" --requests "$RATE_REQUESTS" ;;
          h2load) measure_h2load "$run" "$i" "$b" ;;
          *) echo "unknown scenario: $sc" >&2; exit 1 ;;
        esac
      done
    done
  done
  echo "run $run done" >&2
done

labels=$(for i in "${!VARIANTS[@]}"; do printf '%s\t' "${LABEL[$i]}"; done)
python3 - "$RAW" "$labels" "$RUNS" "$REQUESTS" "$CONNS" "$STREAMS" "$RATE" <<'PY'
import csv, statistics, sys
raw, labels, runs, requests, conns, streams, rate = sys.argv[1:]
labels = labels.rstrip("\t").split("\t")
rows = list(csv.DictReader(open(raw), delimiter="\t"))
med = statistics.median
def vals(v, b, sc, k): return {r["run"]: float(r[k]) for r in rows if r["variant"] == v and r["backend"] == b and r["scenario"] == sc}
def cell(v, f): return f"{f(med(v))} ({f(min(v))}–{f(max(v))})" if v else "–"
i0 = lambda x: f"{x:,.0f}"; f1 = lambda x: f"{x:.1f}"; f2 = lambda x: f"{x:.2f}"
print(f"{runs} runs; throughput: {requests} calls, {conns} x {streams}; CPU: open loop at {rate}/s; h2load: {requests} calls. Median (range); ratios against `{labels[0]}` in the same run.")
print()
print("| backend | variant | rps | ÷ first | p50 µs | p99 µs | CPU µs/call at fixed rate | ÷ first | Redis CPU µs/call | h2load rps | ÷ first | h2load CPU µs/call | ÷ first | h2load Redis CPU µs/call |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for b in sorted({r["backend"] for r in rows}, key=lambda x: x != "memory"):
    base_rps, base_cpu = vals("0", b, "throughput", "rps"), vals("0", b, "fixed_rate", "cpu_us")
    for v, label in enumerate(labels):
        v = str(v)
        rps, cpu = vals(v, b, "throughput", "rps"), vals(v, b, "fixed_rate", "cpu_us")
        r_rps = [rps[k] / base_rps[k] for k in rps if base_rps.get(k)]
        r_cpu = [cpu[k] / base_cpu[k] for k in cpu if base_cpu.get(k)]
        redis_cpu = list(vals(v, b, "fixed_rate", "redis_cpu_us").values()) if b == "redis" else []
        h_rps, h_cpu = vals(v, b, "h2load", "rps"), vals(v, b, "h2load", "cpu_us")
        hb_rps, hb_cpu = vals("0", b, "h2load", "rps"), vals("0", b, "h2load", "cpu_us")
        r_h_rps = [h_rps[k] / hb_rps[k] for k in h_rps if hb_rps.get(k)]
        r_h_cpu = [h_cpu[k] / hb_cpu[k] for k in h_cpu if hb_cpu.get(k)]
        h_redis = list(vals(v, b, "h2load", "redis_cpu_us").values()) if b == "redis" else []
        print(f"| {b} | {label} | {cell(list(rps.values()), i0)} | {cell(r_rps, f2)} "
              f"| {cell(list(vals(v, b, 'throughput', 'p50_us').values()), i0)} | {cell(list(vals(v, b, 'throughput', 'p99_us').values()), i0)} "
              f"| {cell(list(cpu.values()), f1)} | {cell(r_cpu, f2)} | {cell(redis_cpu, f1)} "
              f"| {cell(list(h_rps.values()), i0)} | {cell(r_h_rps, f2)} | {cell(list(h_cpu.values()), f2)} | {cell(r_h_cpu, f2)} | {cell(h_redis, f1)} |")
PY
echo; echo "Load average at the end: $(cut -d" " -f1-3 /proc/loadavg)"
