#!/usr/bin/env bash
# A CPU flamegraph of ratelimitd serving ShouldRateLimit (BACKEND=memory, or redis on a
# throwaway redis-server; bench/lib.sh's unreachable rule, one hot key): perf samples while
# loadgen sends REQUESTS calls, folded and drawn by inferno. Needs perf (linux-perf) and
# inferno (`cargo install inferno`); the release profile keeps line tables for the symbols.
#
# Call stacks: with FP=1 (the default) from frame pointers, on a build of the same source with
# `-C force-frame-pointers=yes` made here in target/fp (a first build takes minutes); with
# FP=0 from DWARF on the default build, where perf's 16 KB stack copies leave most of tokio's
# deep stacks unwound (`[unknown]`: 59% of the samples in an earlier graph).
#
# Usage: [BACKEND=memory|redis] [FP=1] [REQUESTS=60000] [CONNS=2] [STREAMS=8] [TITLE=...] \
#        bench/flamegraph.sh OUT.svg
set -euo pipefail
cd "$(dirname "$0")/.."
SVG=${1:?usage: bench/flamegraph.sh OUT.svg}
REQUESTS=${REQUESTS:-60000}
CONNS=${CONNS:-2}
STREAMS=${STREAMS:-8}
BACKEND=${BACKEND:-memory}
FP=${FP:-1}
TITLE=${TITLE:-ratelimitd ShouldRateLimit, $BACKEND backend}
for tool in perf inferno-collapse-perf inferno-flamegraph; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (apt-get install linux-perf; cargo install inferno)" >&2; exit 1; }
done
if [ "$FP" = 1 ]; then
  RUSTFLAGS="-C force-frame-pointers=yes" CARGO_TARGET_DIR=target/fp \
    cargo build --release --quiet --bin ratelimitd
  BIN=target/fp/release/ratelimitd
  STACKS=fp
else
  STACKS=dwarf,16384
fi
source bench/lib.sh
write_unreachable_rule
extra=()
if [ "$BACKEND" = redis ]; then
  start_redis
  extra=(BACKEND_TYPE=redis REDIS_SOCKET_TYPE=tcp REDIS_URL="127.0.0.1:$RPORT")
fi
start_rl server "${extra[@]}"
pid=${SPID[server]}
# Warm up (connections, first-use registrations) before sampling.
"$LOAD" --target "${ADDR[server]}" --domain bench --key k --requests 2000 >/dev/null
perf record -q -F 499 --call-graph "$STACKS" -p "$pid" -o "$WORK/perf.data" &
perf_pid=$!
PIDS+=("$perf_pid")
sleep 1
"$LOAD" --target "${ADDR[server]}" --domain bench --key k --connections "$CONNS" \
  --streams "$STREAMS" --requests "$REQUESTS"
kill -INT "$perf_pid"
wait "$perf_pid" || true
perf script -i "$WORK/perf.data" 2>/dev/null | inferno-collapse-perf >"$WORK/folded"
inferno-flamegraph --title "$TITLE" --width 1600 <"$WORK/folded" >"$SVG"
echo "wrote $SVG ($(wc -l <"$WORK/folded") stacks)"
