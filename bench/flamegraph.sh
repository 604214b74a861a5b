#!/usr/bin/env bash
# A CPU flamegraph of ratelimitd serving ShouldRateLimit (memory backend, bench/lib.sh's
# unreachable rule, one hot key): perf samples with DWARF call stacks while loadgen sends
# REQUESTS calls, folded and drawn by inferno. Needs perf (linux-perf) and inferno
# (`cargo install inferno`); the release profile keeps line tables for the symbols.
#
# Usage: [REQUESTS=60000] [CONNS=2] [STREAMS=8] [TITLE=...] bench/flamegraph.sh OUT.svg
set -euo pipefail
cd "$(dirname "$0")/.."
SVG=${1:?usage: bench/flamegraph.sh OUT.svg}
REQUESTS=${REQUESTS:-60000}
CONNS=${CONNS:-2}
STREAMS=${STREAMS:-8}
TITLE=${TITLE:-ratelimitd ShouldRateLimit, memory backend}
for tool in perf inferno-collapse-perf inferno-flamegraph; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (apt-get install linux-perf; cargo install inferno)" >&2; exit 1; }
done
source bench/lib.sh
write_unreachable_rule
start_rl memory
pid=${SPID[memory]}
# Warm up (connections, first-use registrations) before sampling.
"$LOAD" --target "${ADDR[memory]}" --domain bench --key k --requests 2000 >/dev/null
perf record -q -F 499 --call-graph dwarf,16384 -p "$pid" -o "$WORK/perf.data" &
perf_pid=$!
PIDS+=("$perf_pid")
sleep 1
"$LOAD" --target "${ADDR[memory]}" --domain bench --key k --connections "$CONNS" \
  --streams "$STREAMS" --requests "$REQUESTS"
kill -INT "$perf_pid"
wait "$perf_pid" || true
perf script -i "$WORK/perf.data" 2>/dev/null | inferno-collapse-perf >"$WORK/folded"
inferno-flamegraph --title "$TITLE" --width 1600 <"$WORK/folded" >"$SVG"
echo "wrote $SVG ($(wc -l <"$WORK/folded") stacks)"
