#!/usr/bin/env bash
# Instructions and heap allocations per ShouldRateLimit call (issue 14), counted by valgrind:
# machine-independent, so figures from a shared, noisy machine still compare.
#
# Each target is run twice under valgrind, for N1 and then N2 calls, and the figure is
# (total(N2) - total(N1)) / (N2 - N1): start-up, connection set-up and shutdown cancel out.
# Targets (TARGETS, space-separated):
#   noop     examples/noop.rs over gRPC: the ceiling (tonic, h2, prost, tokio; nothing else)
#   memory   ratelimitd serve, memory backend, over gRPC
#   redis    ratelimitd serve on a throwaway redis-server (only ratelimitd is counted)
#   hotpath  examples/hotpath.rs: the service called in-process, no network, one thread
# memory - noop is ratelimitd's own work per call. Calls go one at a time (loadgen
# --connections 1 --streams 1; CONNS and STREAMS set others, e.g. CONNS=4 STREAMS=16 for calls
# batched as under load, where reads, writes and wake-ups are shared by many calls) to
# bench/lib.sh's unreachable rule (one descriptor, one hot key, every call counted and answered
# OK).
# Tools (TOOLS): callgrind (instructions, Ir) and dhat (heap blocks allocated).
# OUT (default target/callgrind) keeps every valgrind output file, a TSV of the totals
# (results.tsv) and callgrind_annotate's top functions of each target's N2 run
# (<target>.top.txt, inclusive and exclusive).
#
# dhat counts the blocks allocated through malloc; the default build's allocator, mimalloc,
# maps memory of its own and would show none of ratelimitd's. So dhat runs a build of the same
# source with glibc's malloc (`--no-default-features`, built here into target/glibc), and
# callgrind the default build.
#
# NOOP_ARGS adds the no-op's options (e.g. NOOP_ARGS="--route own", served as ratelimitd is);
# LOAD_ARGS the load generator's (e.g. LOAD_ARGS="--grpc-timeout 1000": a deadline on every
# call, as Envoy sends; long enough for a call slowed down by valgrind).
# BIN measures another build of ratelimitd (DHAT_BIN: its glibc build, for dhat; by default
# BIN itself when BIN is set); RL_ENV adds its settings (e.g. RL_ENV="RUNTIME_FLAVOR=per_core").
#
# Usage: [TARGETS="noop memory redis hotpath"] [TOOLS="callgrind dhat"] [OUT=dir] \
#        [CONNS=1] [STREAMS=1] [BIN=path] [DHAT_BIN=path] [RL_ENV="VAR=value ..."] [NOOP_ARGS="..."] [LOAD_ARGS="..."] \
#        bench/callgrind.sh [N1] [N2]
set -euo pipefail
cd "$(dirname "$0")/.."
N1=${1:-2000}
N2=${2:-12000}
TARGETS=${TARGETS:-noop memory redis hotpath}
TOOLS=${TOOLS:-callgrind dhat}
OUT=${OUT:-target/callgrind}
command -v valgrind >/dev/null || { echo "valgrind is missing: apt-get install -y valgrind" >&2; exit 1; }
DHAT_BIN=${DHAT_BIN:-${BIN:-target/glibc/release/ratelimitd}}
source bench/lib.sh
cargo build --release --quiet --example noop --example hotpath
NOOP=target/release/examples/noop
HOT=target/release/examples/hotpath
DHAT_NOOP=target/glibc/release/examples/noop
if [[ " $TOOLS " == *" dhat "* ]]; then
  CARGO_TARGET_DIR=target/glibc cargo build --release --quiet --no-default-features \
    --bin ratelimitd --example noop
fi
mkdir -p "$OUT"
write_unreachable_rule
[[ " $TARGETS " == *" redis "* ]] && start_redis

# valgrind_args TOOL FILE: the tool's options, its output going to FILE.
valgrind_args() {
  case $1 in
    callgrind) echo "--tool=callgrind --callgrind-out-file=$2" ;;
    dhat) echo "--tool=dhat --dhat-out-file=$2" ;;
  esac
}

# total TOOL FILE LOG: Ir from a callgrind output file, or blocks from dhat's log.
# Ir leaves out what ran inside lazy statics' one-time initialisation (once_cell's
# `OnceCell::initialize`, inclusive): quanta's clock calibration (the metrics exporter's) runs
# there once per process for a stretch of wall time, and its instructions, 9 to 16 million
# depending on how fast valgrind ran, moved the per-call figure of the same build by up to
# 1,200 between runs. Nothing per call runs there.
total() {
  case $1 in
    callgrind)
      local all once
      all=$(awk '/^(summary|totals):/ {print $2; exit}' "$2")
      once=$(callgrind_annotate --inclusive=yes --auto=no --threshold=100 "$2" |
        awk '/OnceCell<T>::initialize \[/ {gsub(",", "", $1); s += $1} END {print s + 0}')
      echo $((all - once))
      ;;
    dhat) sed -nE 's/.*Total: +[0-9,]+ bytes in ([0-9,]+) blocks.*/\1/p' "$3" | tr -d , | head -1 ;;
  esac
}

# serve TARGET TOOL N: starts TARGET under valgrind, sends N calls, stops it (SIGTERM, which
# valgrind passes on, so the output is written at a normal exit). A start that has not
# printed its address within a minute (seen once on a loaded machine) is stopped and retried.
serve() {
  local attempt
  for attempt in 1 2; do
    start_under_valgrind "$@" && return 0
    echo "$1 did not start under valgrind (attempt $attempt)" >&2
  done
  cat "$OUT/$1.out" "$OUT/$1.$2.$3.log" >&2
  exit 1
}

start_under_valgrind() {
  local target=$1 tool=$2 n=$3 file="$OUT/$1.$2.$3" log="$OUT/$1.$2.$3.log" pid addr
  local bin=$BIN noop=$NOOP
  [[ $tool == dhat ]] && bin=$DHAT_BIN noop=$DHAT_NOOP
  rm -f "$file" "$log"
  case $target in
    noop)
      # shellcheck disable=SC2046
      # shellcheck disable=SC2086
      valgrind $(valgrind_args "$tool" "$file") --log-file="$log" "$noop" --addr 127.0.0.1:0 \
        ${NOOP_ARGS:-} >"$OUT/noop.out" &
      pid=$!
      ;;
    memory | redis)
      local backend=()
      [[ $target == redis ]] && backend=(BACKEND_TYPE=redis REDIS_SOCKET_TYPE=tcp REDIS_URL="127.0.0.1:$RPORT")
      # shellcheck disable=SC2046,SC2086
      env -i PATH="$PATH" GRPC_HOST=127.0.0.1 GRPC_PORT=0 HOST=127.0.0.1 PORT=0 \
        DEBUG_HOST=127.0.0.1 DEBUG_PORT=0 USE_STATSD=false LOG_LEVEL=warn "${backend[@]}" \
        ${RL_ENV:-} valgrind $(valgrind_args "$tool" "$file") --log-file="$log" \
        "$bin" serve --config "$WORK/bench.yaml" 2>"$OUT/$target.out" &
      pid=$!
      ;;
  esac
  PIDS+=("$pid")
  if ! addr=$(listening_addr "$OUT/$target.out" "$pid" 600 0.1); then
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    return 1
  fi
  # shellcheck disable=SC2086
  "$LOAD" --target "$addr" --domain bench --key k --connections "${CONNS:-1}" --streams "${STREAMS:-1}" \
    --requests "$n" --max-seconds 600 ${LOAD_ARGS:-} >"$OUT/$target.$tool.$n.load"
  grep -q " errors=0" "$OUT/$target.$tool.$n.load" ||
    { echo "$target: loadgen saw errors: $(cat "$OUT/$target.$tool.$n.load")" >&2; exit 1; }
  kill -TERM "$pid"
  wait "$pid" || true
}

# inprocess TOOL N: examples/hotpath.rs under valgrind for N calls.
inprocess() {
  local tool=$1 n=$2 file="$OUT/hotpath.$1.$2" log="$OUT/hotpath.$1.$2.log"
  rm -f "$file" "$log"
  # shellcheck disable=SC2046
  valgrind $(valgrind_args "$tool" "$file") --log-file="$log" "$HOT" --requests "$n" >/dev/null
}

printf 'target\ttool\tn1\ttotal_n1\tn2\ttotal_n2\tper_call\n' >"$OUT/results.tsv"
for target in $TARGETS; do
  for tool in $TOOLS; do
    for n in "$N1" "$N2"; do
      if [[ $target == hotpath ]]; then inprocess "$tool" "$n"; else serve "$target" "$tool" "$n"; fi
    done
    t1=$(total "$tool" "$OUT/$target.$tool.$N1" "$OUT/$target.$tool.$N1.log")
    t2=$(total "$tool" "$OUT/$target.$tool.$N2" "$OUT/$target.$tool.$N2.log")
    per=$(awk -v a="$t1" -v b="$t2" -v n1="$N1" -v n2="$N2" 'BEGIN {printf "%.1f", (b - a) / (n2 - n1)}')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$target" "$tool" "$N1" "$t1" "$N2" "$t2" "$per" >>"$OUT/results.tsv"
  done
  if [[ " $TOOLS " == *" callgrind "* ]]; then
    {
      echo "== $target: inclusive (N2=$N2 calls) =="
      callgrind_annotate --inclusive=yes "$OUT/$target.callgrind.$N2" 2>/dev/null | sed -n '1,60p'
      echo "== $target: exclusive (N2=$N2 calls) =="
      callgrind_annotate "$OUT/$target.callgrind.$N2" 2>/dev/null | sed -n '1,60p'
    } >"$OUT/$target.top.txt"
  fi
done

# Per call, and ratelimitd's own work (memory - noop, redis - noop).
column -t -s $'\t' "$OUT/results.tsv"
awk -F'\t' 'NR > 1 {v[$1 "," $2] = $7}
  END {
    for (t in v) {
      split(t, p, ",")
      if (p[1] != "noop" && p[1] != "hotpath" && ("noop," p[2]) in v)
        printf "%s - noop (%s): %.1f per call\n", p[1], p[2], v[t] - v["noop," p[2]]
    }
  }' "$OUT/results.tsv"
echo "valgrind files, results.tsv and <target>.top.txt in $OUT"
