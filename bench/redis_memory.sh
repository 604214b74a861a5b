#!/usr/bin/env bash
# Redis memory per counter key, per algorithm (issue 14; docs/benchmarks.md, "Redis memory per
# key"). Release builds, loopback only.
#
# For each rule below, in a rotated order from run to run: a fresh redis-server and a
# ratelimitd on it (both on free 127.0.0.1 ports), one warm-up call on another descriptor
# (loads the script, opens the connections), then K distinct descriptor values sent once each
# (`loadgen --keys K --requests K --dist cycle`, values v0 .. v<K-1>). Reported: `used_memory`
# after minus before, divided by K (bytes per descriptor value) and by the keys added (DBSIZE
# after minus before); `MEMORY USAGE` of sample keys, their type and encoding; the length of
# the key names. Every window is an hour or longer (the three-limit rule's shortest is a minute)
# so no key expires while the run lasts; the script checks the key count to be sure.
# fixed_window is the reference's (envoyproxy/ratelimit) layout: one integer per key and window,
# key `domain_key_value_windowstart`, with a TTL.
#
# Usage: [K=100000] [OUT=raw.tsv] bench/redis_memory.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-2}
K=${K:-100000}
source bench/lib.sh

# Rule `A` is measured, `warm_A` (same limits) takes the warm-up call; limits one hit never
# reaches. The four rule keys (fixed, slide, token, three) have one length, so key names differ
# only by what each algorithm adds. A token bucket's key lives until the bucket is full again
# (plus jitter): at 10 per hour one hit keeps it six minutes, longer than the run.
{
  printf 'domain: bench\ndescriptors:\n'
  for key in fixed warm_fixed; do
    printf '  - key: %s\n    rate_limit: {unit: hour, requests_per_unit: 1000, algorithm: fixed_window}\n' "$key"
  done
  for key in slide warm_slide; do
    printf '  - key: %s\n    rate_limit: {unit: hour, requests_per_unit: 1000, algorithm: sliding_window}\n' "$key"
  done
  for key in token warm_token; do
    printf '  - key: %s\n    rate_limit: {unit: hour, requests_per_unit: 10, algorithm: token_bucket}\n' "$key"
  done
  for key in three warm_three; do
    printf '  - key: %s\n    rate_limits:\n' "$key"
    printf '      - {unit: %s, requests_per_unit: %s}\n' minute 100 hour 1000 day 10000
  done
} >"$WORK/bench.yaml"
"$BIN" check-config --config "$WORK/bench.yaml" >/dev/null
ALGS=(fixed slide token three)
declare -A PER_VALUE=([fixed]=1 [slide]=1 [token]=1 [three]=3)

info_field() { redis-cli -p "$RPORT" info memory | tr -d '\r' | awk -F: -v f="$1" '$1 == f {print $2}'; }

RAW=$WORK/raw.tsv
SAMPLES=$WORK/samples.tsv
printf 'run\talg\tk\tkeys_added\tused_before\tused_after\tbytes_per_value\tbytes_per_key\tkey_len_min\tkey_len_mean\tkey_len_max\tloadavg1\n' >"$RAW"
printf 'alg\tkey\tlen\ttype\tencoding\tmemory_usage\tttl\n' >"$SAMPLES"
echo "load average at start: $(cat /proc/loadavg)" >&2
n=${#ALGS[@]}
for run in $(seq "$RUNS"); do
  for i in $(seq 0 $((n - 1))); do
    a=${ALGS[$(((i + run - 1) % n))]}
    start_redis
    start_rl "$a" BACKEND_TYPE=redis REDIS_SOCKET_TYPE=tcp REDIS_URL="127.0.0.1:$RPORT"
    "$LOAD" --target "${ADDR[$a]}" --domain bench --key "warm_$a" --requests 1 \
      --connections 1 --streams 1 >/dev/null
    k0=$(redis-cli -p "$RPORT" dbsize); u0=$(info_field used_memory)
    out=$("$LOAD" --target "${ADDR[$a]}" --domain bench --key "$a" --keys "$K" \
      --requests "$K" --dist cycle --max-seconds 300)
    k1=$(redis-cli -p "$RPORT" dbsize); u1=$(info_field used_memory)
    grep -q " over_limit=0 errors=0 " <<<"$out" || { echo "$a: not every call OK: $out" >&2; exit 1; }
    added=$((k1 - k0))
    [ "$added" = $((K * PER_VALUE[$a])) ] ||
      echo "note: $a run $run: $added keys added for $K values (expected $((K * PER_VALUE[$a])))" >&2
    # Key-name lengths over every measured key.
    lens=$(redis-cli -p "$RPORT" --scan --pattern "bench_${a}_*" |
      awk '{l = length($0); s += l; if (!m || l < m) m = l; if (l > x) x = l} END {printf "%d\t%.1f\t%d", m, s / NR, x}')
    if [ "$run" = 1 ]; then
      # Samples: the first and the last value sent, each of its keys.
      for v in v0 "v$((K - 1))"; do
        redis-cli -p "$RPORT" --scan --pattern "bench_${a}_${v}_*" | sort | while read -r key; do
          printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$a" "$key" "${#key}" \
            "$(redis-cli -p "$RPORT" type "$key")" "$(redis-cli -p "$RPORT" object encoding "$key")" \
            "$(redis-cli -p "$RPORT" memory usage "$key")" "$(redis-cli -p "$RPORT" ttl "$key")" >>"$SAMPLES"
        done
      done
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$run" "$a" "$K" "$added" "$u0" "$u1" \
      "$(awk -v a="$u0" -v b="$u1" -v k="$K" 'BEGIN {printf "%.1f", (b - a) / k}')" \
      "$(awk -v a="$u0" -v b="$u1" -v k="$added" 'BEGIN {printf "%.1f", (b - a) / k}')" \
      "$lens" "$(cut -d' ' -f1 /proc/loadavg)" >>"$RAW"
    kill "${SPID[$a]}" "$REDIS_PID"
    for p in "${SPID[$a]}" "$REDIS_PID"; do
      for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
    done
  done
  echo "run $run of $RUNS done, load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
done
echo "load average at end: $(cat /proc/loadavg)" >&2
[ -z "${OUT:-}" ] || cp "$RAW" "$OUT"

python3 - "$RAW" "$SAMPLES" "$RUNS" "$K" "$(redis-server --version | sed -E 's/.*v=([^ ]+).*/\1/')" <<'PY'
import csv, statistics, sys
raw, samples, runs, k, version = sys.argv[1:]
rows = list(csv.DictReader(open(raw), delimiter="\t"))
smp = list(csv.DictReader(open(samples), delimiter="\t"))
med = statistics.median
names = {"fixed": "fixed_window (the reference's layout)", "slide": "sliding_window",
         "token": "token_bucket", "three": "three limits (minute, hour, day; fixed windows)"}
algs = [a for a in ("fixed", "slide", "token", "three") if any(r["alg"] == a for r in rows)]
def cell(v):
    return f"{med(v):.1f} ({min(v):.1f}–{max(v):.1f})" if len(set(v)) > 1 else f"{v[0]:.1f}"
fixed = {r["run"]: float(r["bytes_per_value"]) for r in rows if r["alg"] == "fixed"}
print(f"redis-server {version}; {k} distinct values per rule; {runs} run(s), each on a fresh "
      "redis-server; median (range over runs)")
print()
print("| rule | Redis keys per value | used_memory Δ per value (B) | ÷ fixed_window | per Redis key (B) "
      "| key name length (min / mean / max) |")
print("|---|---|---|---|---|---|")
for a in algs:
    mine = [r for r in rows if r["alg"] == a]
    per_value = [float(r["bytes_per_value"]) for r in mine]
    per_key = [float(r["bytes_per_key"]) for r in mine]
    ratio = [float(r["bytes_per_value"]) / fixed[r["run"]] for r in mine if r["run"] in fixed]
    kpv = sorted({int(r["keys_added"]) / int(r["k"]) for r in mine})
    r0 = mine[0]
    print(f"| {names[a]} | {'/'.join(f'{x:g}' for x in kpv)} | {cell(per_value)} | "
          f"{'1' if a == 'fixed' else (f'{med(ratio):.2f}' if ratio else '–')} | {cell(per_key)} | "
          f"{r0['key_len_min']} / {r0['key_len_mean']} / {r0['key_len_max']} |")
print()
print("Sample keys (first and last value sent):")
print()
print("| rule | key | length | type | encoding | MEMORY USAGE (B) | TTL s |")
print("|---|---|---|---|---|---|---|")
for s in smp:
    print(f"| {s['alg']} | `{s['key']}` | {s['len']} | {s['type']} | {s['encoding']} | "
          f"{s['memory_usage']} | {s['ttl']} |")
la = [float(r["loadavg1"]) for r in rows]
print()
print(f"1-minute load average during the runs: {min(la):.2f}–{max(la):.2f}")
PY
