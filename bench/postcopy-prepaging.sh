#!/usr/bin/env bash
# The prepaging comparison of the post-copy paper (section 5.4, Fig. 17 shape): how many
# network faults (demand requests) a guest takes during post-copy with each push order,
# against push-only (linear) as the baseline, in the same run. Every row is a real
# `livemig migrate --local --link RATE --strategy postcopy` (two network namespaces joined by
# a tc-shaped veth pair; needs root), with a workload of THREADS writers, each over its own
# slice of the working set (the paper's several processes, each with its own locality).
# Pre-copy of the same guest on the same link is printed as a second baseline (downtime).
#
#   bench/postcopy-prepaging.sh [LIVEMIG_BIN] ; env: LINK=1gbit SIZE=512M WSS=256M THREADS=8
#   WORKLOAD=seq RATE=0 (pages/s over all threads, 0 = flat out) WARMUP=0.5 (seconds the
#   workload runs before the migration: with a rate, long enough to populate WSS) RUNS=1
set -euo pipefail
BIN=${1:-${LIVEMIG_BIN:-target/release/livemig}}
LINK=${LINK:-1gbit}
SIZE=${SIZE:-512M}
WSS=${WSS:-256M}
THREADS=${THREADS:-8}
WORKLOAD=${WORKLOAD:-seq}
RATE=${RATE:-0}
RUNS=${RUNS:-1}
WARMUP=${WARMUP:-0.5}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

command -v jq >/dev/null || { echo "needs jq" >&2; exit 1; }
[ -x "$BIN" ] || { echo "no livemig binary at $BIN (cargo build --release -p livemig)" >&2; exit 1; }

orders=(
  "linear|--push linear"
  "bubbling-1-forward|--push bubbling --pivots 1 --expansion forward"
  "bubbling-1-dual|--push bubbling --pivots 1 --expansion dual"
  "bubbling-7-forward|--push bubbling --pivots 7 --expansion forward"
  "bubbling-7-dual|--push bubbling --pivots 7 --expansion dual"
)
common=(--local --link "$LINK" --transport tcp --size "$SIZE" --wss "$WSS" --threads "$THREADS"
        --workload "$WORKLOAD" --rate "$RATE" --warmup "$WARMUP" --after 0.5 --json --no-progress)

for r in $(seq 1 "$RUNS"); do
  for o in "${orders[@]}"; do
    name=${o%%|*}; flags=${o#*|}
    echo "== $name (run $r), $WORKLOAD x$THREADS, wss $WSS, link $LINK" >&2
    # shellcheck disable=SC2086
    "$BIN" migrate "${common[@]}" --strategy postcopy $flags >"$OUT/$name-$r.json" 2>"$OUT/$name-$r.err" || true
  done
  echo "== pre-copy (run $r)" >&2
  "$BIN" migrate "${common[@]}" --strategy precopy >"$OUT/precopy-$r.json" 2>"$OUT/precopy-$r.err" || true
done

# The destination's report is the JSON line on stderr that carries demand_requests.
dest() { grep -h '"demand_requests"' "$1" | tail -n 1; }

printf '\nPost-copy push orders, %s x%s writers over %s of a %s guest, %s link (%s run(s) each)\n' \
  "$WORKLOAD" "$THREADS" "$WSS" "$SIZE" "$LINK" "$RUNS"
printf '%-20s %4s %9s %10s %9s %9s %9s %11s %11s %12s\n' order run faults vs_linear pushed demanded total_s downtime_ms fault_p50_us fault_p99_us
for r in $(seq 1 "$RUNS"); do
  base=$(dest "$OUT/linear-$r.err" | jq -r '.demand_requests // empty' 2>/dev/null || true)
  for o in "${orders[@]}"; do
    name=${o%%|*}
    s="$OUT/$name-$r.json"
    d=$(dest "$OUT/$name-$r.err" || true)
    if ! jq -e . "$s" >/dev/null 2>&1 || [ -z "$d" ]; then
      printf '%-20s %4s  failed: %s\n' "$name" "$r" "$(tail -n 1 "$OUT/$name-$r.err")"
      continue
    fi
    faults=$(jq -r .demand_requests <<<"$d")
    ratio=$( [ -n "$base" ] && [ "$base" != 0 ] && awk -v a="$faults" -v b="$base" 'BEGIN{printf "%.2fx", a/b}' || echo -)
    printf '%-20s %4s %9s %10s %9s %9s %9.2f %11.1f %11.0f %12.0f\n' "$name" "$r" "$faults" "$ratio" \
      "$(jq -r .pushed_pages "$s")" "$(jq -r .demanded_pages "$s")" "$(jq -r .total_s "$s")" \
      "$(jq -r .downtime_ms "$s")" "$(jq -r '.fault_p50_us // 0' <<<"$d")" "$(jq -r '.fault_p99_us // 0' <<<"$d")"
  done
  p="$OUT/precopy-$r.json"
  if jq -e . "$p" >/dev/null 2>&1; then
    printf '%-20s %4s %9s %10s %9s %9s %9.2f %11.1f   (pre-copy, ended by %s)\n' precopy "$r" - - \
      "$(jq -r .pages_sent "$p")" - "$(jq -r .total_s "$p")" "$(jq -r '.downtime_ms // 0' "$p")" "$(jq -r .end_rule "$p")"
  fi
done
