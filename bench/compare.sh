#!/usr/bin/env bash
# Side by side in one session (issue 14's measuring kit): the no-op ceiling server
# (examples/noop.rs), ratelimitd in memory and on Redis, and redis-benchmark replaying the
# exact script call ratelimitd sends (the Redis ceiling). Release builds, loopback only; every
# process is started here on free ports and stopped by PID at exit.
#
# Each run measures, rotating the servers' order from run to run so drift in the machine's
# load falls on all alike:
#   throughput   closed loop, CONNS connections x STREAMS streams, REQUESTS calls, one hot key
#   single       one call at a time (1 x 1), SINGLE calls: mean, max, calls at or over 10 ms
#   single_h2load the same with h2load (a lighter client than loadgen, the one issue 14's
#                one-call targets were set with): mean, min, max
#   throughput_h2load closed loop with h2load, H2_CLIENTS connections x H2_STREAMS streams
#                (16 x 16 by default, issue 14's own set-up), REQUESTS calls: rps, CPU per call
#   fixed_rate   open loop at RATE calls/s for RATE_REQUESTS calls: server CPU per call
#   half_rate    Redis backend, open loop at half of this run's Redis throughput: p99; and the
#                no-op at the same rate, the floor this machine and load generator measure
#   desc5/desc20 Redis backend, 5 and 20 descriptors per call: rps, p50/p99, EVALSHA per call
# Server CPU is utime+stime from /proc/PID/stat around each measurement; Redis's from its own
# /proc entry; the client's (loadgen's or h2load's) from this script's reaped children (the
# shell's cutime+cstime); script calls from INFO commandstats (reset before each measurement).
# Under h2load, where the three processes keep the cores busy, it prints what CPU per call 0.95
# of the no-op's throughput would allow the memory server.
# Medians and ranges over runs are printed, with every ratio taken inside one run.
#
# RL_ENV adds settings to both ratelimitd servers (e.g. RL_ENV="RUNTIME_FLAVOR=multi_thread");
# NOOP_RUNTIME is the no-op's runtime (per_core, ratelimitd's default, or multi_thread);
# NOOP_ROUTE its route: own (the default: each connection served by hyper directly and RLS
# calls past tonic's router, as ratelimitd serves them, src/server.rs and src/rls_route.rs),
# direct (tonic's transport server, RLS calls past its router) or router (a plain tonic
# server, the ceiling before either).
#
# Usage: [CONNS=4] [STREAMS=16] [SINGLE=40000] [RATE=10000] [RATE_REQUESTS=50000] \
#        [H2_CLIENTS=16] [H2_STREAMS=16] \
#        [OUT=raw.tsv] [RL_ENV="VAR=value ..."] [NOOP_RUNTIME=per_core] [NOOP_ROUTE=own] \
#        bench/compare.sh [RUNS] [REQUESTS]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
REQUESTS=${2:-100000}
CONNS=${CONNS:-4}
STREAMS=${STREAMS:-16}
SINGLE=${SINGLE:-40000}
RATE=${RATE:-10000}
RATE_REQUESTS=${RATE_REQUESTS:-50000}
source bench/lib.sh
cargo build --release --quiet --example noop
NOOP=target/release/examples/noop

write_unreachable_rule

start_redis
# shellcheck disable=SC2086
start_rl memory ${RL_ENV:-}
# shellcheck disable=SC2086
start_rl redis BACKEND_TYPE=redis REDIS_SOCKET_TYPE=tcp REDIS_URL="127.0.0.1:$RPORT" ${RL_ENV:-}
"$NOOP" --addr 127.0.0.1:0 --runtime "${NOOP_RUNTIME:-per_core}" --route "${NOOP_ROUTE:-own}" \
  >"$WORK/noop.out" &
SPID[noop]=$!
PIDS+=("${SPID[noop]}")
for _ in $(seq 200); do grep -qs listening "$WORK/noop.out" && break; sleep 0.05; done
ADDR[noop]=$(sed -E 's/.*grpc=//' "$WORK/noop.out")

RAW=${OUT:-$WORK/raw.tsv}
printf 'run\tscenario\tserver\trequests\trps\tmean_us\tp50_us\tp99_us\tp999_us\tmax_us\tslow\terrors\tserver_cpu_us\tredis_cpu_us\tevalsha_per_call\tloadavg1\tclient_cpu_us\n' >"$RAW"

evalsha_calls() {
  redis-cli -p "$RPORT" info commandstats | tr -d '\r' |
    awk -F'[:=,]' '/^cmdstat_evalsha:/ {print $3; f=1} END {if (!f) print 0}'
}

# reaped_ticks: sets REAPED to the CPU time (clock ticks) of this script's children reaped so
# far (the shell's own cutime + cstime), read without forking one more. Read right before and
# after a load generator runs, the difference is that run's CPU: the client's share of the
# machine.
reaped_ticks() {
  local stat f
  read -r stat </proc/$$/stat
  read -r -a f <<<"${stat##*) }"
  REAPED=$((f[13] + f[14]))
}

# started SERVER: resets Redis's command stats and notes SERVER's, Redis's and the client's
# CPU time, for the row written after the measurement (whose client figure ends at K1).
started() {
  redis-cli -p "$RPORT" config resetstat >/dev/null
  C0=$(cpu_ticks "${SPID[$1]}"); R0=$(cpu_ticks "$REDIS_PID")
  reaped_ticks; K0=$REAPED
}

# row RUN SCENARIO SERVER N RPS MEAN P50 P99 P999 MAX SLOW ERRORS: one raw row, with CPU per
# call (SERVER's, Redis's, and the client's up to K1) and EVALSHA calls per call since
# `started`.
row() {
  local n=$4 c1 r1 e1
  c1=$(cpu_ticks "${SPID[$3]}"); r1=$(cpu_ticks "$REDIS_PID"); e1=$(evalsha_calls)
  printf '%s\t' "$@" >>"$RAW"
  printf '%s\t%s\t%s\t%s\t%s\n' \
    "$(cpu_us_per_call "$C0" "$c1" "$n")" "$(cpu_us_per_call "$R0" "$r1" "$n")" \
    "$(awk -v e="$e1" -v n="$n" 'BEGIN {printf "%.3f", e/n}')" \
    "$(cut -d' ' -f1 /proc/loadavg)" "$(cpu_us_per_call "$K0" "$K1" "$n")" >>"$RAW"
}

# measure RUN SCENARIO SERVER LOADGEN-ARGS...: one loadgen run against SERVER, one raw row.
measure() {
  local run=$1 scenario=$2 server=$3 out; shift 3
  started "$server"
  out=$("$LOAD" --target "${ADDR[$server]}" --domain bench --key k "$@")
  reaped_ticks; K1=$REAPED
  [ "$(field errors "$out")" = 0 ] || { echo "errors in $scenario/$server: $out" >&2; exit 1; }
  row "$run" "$scenario" "$server" "$(field requests "$out")" "$(field rps "$out")" \
    "$(field mean_us "$out")" "$(field p50_us "$out")" "$(field p99_us "$out")" \
    "$(field p999_us "$out")" "$(field max_us "$out")" "$(field slow "$out")" 0
  LAST_RPS=$(field rps "$out")
}

# measure_h2load RUN SCENARIO SERVER N CLIENTS STREAMS: N calls with h2load, one raw row
# (h2load gives the mean, min and max; min goes in the p50 column, the percentiles it lacks
# stay empty).
measure_h2load() {
  local run=$1 scenario=$2 server=$3 n=$4 out
  started "$server"
  out=$(h2load_calls "$n" "$5" "$6" "${ADDR[$server]}" "$WORK/body1")
  reaped_ticks; K1=$REAPED
  [ "$(field failed "$out")" = 0 ] || { echo "h2load failures against $server: $out" >&2; exit 1; }
  row "$run" "$scenario" "$server" "$n" "$(field rps "$out")" "$(field mean_us "$out")" \
    "$(field min_us "$out")" "" "" "$(field max_us "$out")" "" 0
}
write_grpc_body "$WORK/body1" 1

# Warm-up: connections, the script cache, the allocator.
for s in noop memory redis; do
  "$LOAD" --target "${ADDR[$s]}" --domain bench --key k --requests 20000 >/dev/null
done

SERVERS=(noop memory redis)
for run in $(seq "$RUNS"); do
  # Rotate the order: run 1 noop, memory, redis; run 2 memory, redis, noop; ...
  order=()
  for i in 0 1 2; do order+=("${SERVERS[$(((i + run - 1) % 3))]}"); done
  for s in "${order[@]}"; do
    measure "$run" throughput "$s" --connections "$CONNS" --streams "$STREAMS" --requests "$REQUESTS"
    [ "$s" = redis ] && redis_rps=$LAST_RPS
  done
  for s in "${order[@]}"; do
    measure "$run" single "$s" --connections 1 --streams 1 --requests "$SINGLE"
  done
  for s in "${order[@]}"; do
    measure_h2load "$run" single_h2load "$s" "$SINGLE" 1 1
  done
  for s in "${order[@]}"; do
    measure_h2load "$run" throughput_h2load "$s" "$REQUESTS" "${H2_CLIENTS:-16}" "${H2_STREAMS:-16}"
  done
  for s in "${order[@]}"; do
    measure "$run" fixed_rate "$s" --connections "$CONNS" --streams "$STREAMS" \
      --rate "$RATE" --requests "$RATE_REQUESTS"
  done
  half=$(awk -v r="$redis_rps" 'BEGIN {printf "%.0f", r/2}')
  for s in redis noop; do
    measure "$run" half_rate "$s" --connections "$CONNS" --streams "$STREAMS" \
      --rate "$half" --requests $((half * 5))
  done
  for d in 5 20; do
    measure "$run" "desc$d" redis --connections "$CONNS" --streams "$STREAMS" \
      --requests $((REQUESTS / 4)) --descriptors "$d" --keys 1000 --dist uniform
  done
  echo "run $run done" >&2
done

# The Redis ceiling: the exact EVALSHA ratelimitd sends for one call, captured with MONITOR
# and replayed by redis-benchmark with as many clients as ratelimitd had calls in flight.
redis-cli -p "$RPORT" monitor >"$WORK/monitor.txt" &
MON=$!
PIDS+=("$MON")
sleep 0.3
"$LOAD" --target "${ADDR[redis]}" --domain bench --key k --requests 1 --connections 1 --streams 1 >/dev/null
sleep 0.3
kill "$MON"
mapfile -t CALL < <(python3 - "$WORK/monitor.txt" <<'PY'
import shlex, sys
for line in open(sys.argv[1]):
    if '"EVALSHA"' in line or '"evalsha"' in line:
        for arg in shlex.split(line.split("]", 1)[1]):
            print(arg)
        break
PY
)
[ "${#CALL[@]}" -gt 2 ] || { echo "no EVALSHA captured" >&2; exit 1; }
bench_redis() { # label, command...
  local label=$1; shift
  redis-benchmark -p "$RPORT" -c $((CONNS * STREAMS)) -n "$REQUESTS" --csv "$@" |
    tail -1 | awk -F'","' -v l="$label" '{print l "\t" $2}'
}
CEIL=$WORK/ceiling.tsv
for run in $(seq "$RUNS"); do
  bench_redis evalsha "${CALL[@]}" >>"$CEIL"
  bench_redis incrby INCRBY bench_ceiling_key 1 >>"$CEIL"
done

python3 - "$RAW" "$CEIL" "$RUNS" "$REQUESTS" "$CONNS" "$STREAMS" "$SINGLE" "$RATE" <<'PY'
import csv, statistics, sys
raw, ceil, runs, requests, conns, streams, single, rate = sys.argv[1:]
rows = list(csv.DictReader(open(raw), delimiter="\t"))
med = statistics.median
def get(sc, sv, k, run=None):
    return [float(r[k]) for r in rows if r["scenario"] == sc and r["server"] == sv and (run is None or r["run"] == run)]
def one(sc, sv, k, run):
    v = get(sc, sv, k, run)
    return v[0] if v else None
def cell(v, fmt):
    return f"{fmt(med(v))} ({fmt(min(v))}–{fmt(max(v))})" if v else "–"
def ratio(sc_a, sv_a, sc_b, sv_b, k):
    out = []
    for run in sorted({r["run"] for r in rows}):
        a, b = one(sc_a, sv_a, k, run), one(sc_b, sv_b, k, run)
        if a is not None and b:
            out.append(a / b)
    return out
i0 = lambda x: f"{x:,.0f}"; f1 = lambda x: f"{x:.1f}"; f2 = lambda x: f"{x:.2f}"; f3 = lambda x: f"{x:.3f}"
la = [float(r["loadavg1"]) for r in rows]
print(f"{runs} runs; median (range); ratios within each run. Load average during the runs: {min(la):.1f}–{max(la):.1f}")
print()
print(f"Throughput: closed loop, {conns} connections x {streams} streams, {requests} calls, one hot key")
print()
print("| server | rps | ÷ no-op | p50 µs | p99 µs | p99.9 µs | server CPU µs/call | Redis CPU µs/call | EVALSHA/call | loadgen CPU µs/call |")
print("|---|---|---|---|---|---|---|---|---|---|")
for s in ("noop", "memory", "redis"):
    print(f"| {s} | {cell(get('throughput', s, 'rps'), i0)} | {cell(ratio('throughput', s, 'throughput', 'noop', 'rps'), f2)} "
          f"| {cell(get('throughput', s, 'p50_us'), i0)} | {cell(get('throughput', s, 'p99_us'), i0)} | {cell(get('throughput', s, 'p999_us'), i0)} "
          f"| {cell(get('throughput', s, 'server_cpu_us'), f1)} | {cell(get('throughput', s, 'redis_cpu_us'), f1) if s == 'redis' else '–'} "
          f"| {cell(get('throughput', s, 'evalsha_per_call'), f3) if s == 'redis' else '–'} | {cell(get('throughput', s, 'client_cpu_us'), f1)} |")
print()
print(f"One call at a time: {single} calls per server and run")
print()
print("| server | mean µs | p50 µs | p99 µs | p99.9 µs | max µs | calls ≥ 10 ms |")
print("|---|---|---|---|---|---|---|")
for s in ("noop", "memory", "redis"):
    print(f"| {s} | {cell(get('single', s, 'mean_us'), i0)} | {cell(get('single', s, 'p50_us'), i0)} | {cell(get('single', s, 'p99_us'), i0)} "
          f"| {cell(get('single', s, 'p999_us'), i0)} | {cell(get('single', s, 'max_us'), i0)} | {cell(get('single', s, 'slow'), i0)} |")
print()
print(f"One call at a time with h2load (-c 1 -m 1): {single} calls per server and run")
print()
print("| server | mean µs | ÷ no-op | min µs | max µs |")
print("|---|---|---|---|---|")
for s in ("noop", "memory", "redis"):
    print(f"| {s} | {cell(get('single_h2load', s, 'mean_us'), i0)} | {cell(ratio('single_h2load', s, 'single_h2load', 'noop', 'mean_us'), f2)} "
          f"| {cell(get('single_h2load', s, 'p50_us'), i0)} | {cell(get('single_h2load', s, 'max_us'), i0)} |")
print()
print(f"Throughput with h2load (-c 16 -m 16 unless H2_CLIENTS/H2_STREAMS say otherwise): {requests} calls")
print()
print("| server | rps | ÷ no-op | server CPU µs/call | ÷ no-op | ÷ memory | Redis CPU µs/call | h2load CPU µs/call |")
print("|---|---|---|---|---|---|---|---|")
for s in ("noop", "memory", "redis"):
    print(f"| {s} | {cell(get('throughput_h2load', s, 'rps'), i0)} | {cell(ratio('throughput_h2load', s, 'throughput_h2load', 'noop', 'rps'), f2)} "
          f"| {cell(get('throughput_h2load', s, 'server_cpu_us'), f1)} | {cell(ratio('throughput_h2load', s, 'throughput_h2load', 'noop', 'server_cpu_us'), f2)} "
          f"| {cell(ratio('throughput_h2load', s, 'throughput_h2load', 'memory', 'server_cpu_us'), f2)} "
          f"| {cell(get('throughput_h2load', s, 'redis_cpu_us'), f1) if s == 'redis' else '–'} "
          f"| {cell(get('throughput_h2load', s, 'client_cpu_us'), f1)} |")
print()
# Client, server and Redis share the machine's cores, all busy under h2load: a call's
# throughput is bounded by what it costs the three together. What 0.95 of the no-op's
# throughput would allow the memory server, at the client's own cost per call (per run).
def allowed(run):
    n, m = (lambda k: one('throughput_h2load', 'noop', k, run)), (lambda k: one('throughput_h2load', 'memory', k, run))
    if None in (n('server_cpu_us'), n('client_cpu_us'), m('client_cpu_us')):
        return None
    return (n('server_cpu_us') + n('client_cpu_us')) / 0.95 - m('client_cpu_us')
runs_ = sorted({r["run"] for r in rows})
al = [a for a in map(allowed, runs_) if a is not None]
nz = get('throughput_h2load', 'noop', 'server_cpu_us')
if al and nz:
    print(f"Under h2load the three processes share the cores: 0.95 of the no-op's throughput allows the memory "
          f"server {cell(al, f1)} µs of CPU per call, {f2(med(al) / med(nz))}× the no-op's (the CPU target allows 1.15×).")
    print()
print(f"Server CPU per call at a fixed {rate} calls/s (open loop)")
print()
print("| server | server CPU µs/call | ÷ no-op | ÷ memory | Redis CPU µs/call | p99 µs |")
print("|---|---|---|---|---|---|")
for s in ("noop", "memory", "redis"):
    print(f"| {s} | {cell(get('fixed_rate', s, 'server_cpu_us'), f1)} | {cell(ratio('fixed_rate', s, 'fixed_rate', 'noop', 'server_cpu_us'), f2)} "
          f"| {cell(ratio('fixed_rate', s, 'fixed_rate', 'memory', 'server_cpu_us'), f2)} "
          f"| {cell(get('fixed_rate', s, 'redis_cpu_us'), f1) if s == 'redis' else '–'} | {cell(get('fixed_rate', s, 'p99_us'), i0)} |")
print()
print("Redis backend at half its saturating rate (open loop; the no-op at the same rate), and with several descriptors (1,000 uniform keys)")
print()
print("| scenario | rps | p50 µs | p99 µs | max µs | EVALSHA/call | Redis CPU µs/call |")
print("|---|---|---|---|---|---|---|")
for sc, sv in (("half_rate", "redis"), ("half_rate", "noop"), ("desc5", "redis"), ("desc20", "redis")):
    label = sc if sv == "redis" else f"{sc}, no-op"
    redis_only = lambda k, f: cell(get(sc, sv, k), f) if sv == "redis" else "–"
    print(f"| {label} | {cell(get(sc, sv, 'rps'), i0)} | {cell(get(sc, sv, 'p50_us'), i0)} | {cell(get(sc, sv, 'p99_us'), i0)} "
          f"| {cell(get(sc, sv, 'max_us'), i0)} | {redis_only('evalsha_per_call', f3)} | {redis_only('redis_cpu_us', f1)} |")
print()
c = {}
for line in open(ceil):
    label, rps = line.rstrip("\n").split("\t")
    c.setdefault(label, []).append(float(rps))
print(f"Redis ceiling (redis-benchmark, {int(conns) * int(streams)} clients, no pipelining): "
      f"our EVALSHA {cell(c.get('evalsha', []), i0)} rps, INCRBY {cell(c.get('incrby', []), i0)} rps; "
      f"ratelimitd on Redis reaches {f2(med(get('throughput', 'redis', 'rps')) / med(c['evalsha']))} of the EVALSHA ceiling (medians)")
PY
