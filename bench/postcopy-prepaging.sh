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
#   SWEEP="8M 32M 128M" (also run the stress test, below; TABLE=0 skips the first table) WORKLOAD=seq RATE=0 (pages/s over all threads, 0 = flat out) WARMUP=0.5 (seconds the
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

# The destination's report is the JSON line on stderr that carries demand_requests.
dest() { grep -h '"demand_requests"' "$1" | tail -n 1; }

if [ "${TABLE:-1}" = 1 ]; then
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

fi

# The paper's stress test: one sequential writer over working sets of growing size, network
# faults as a share of the working set's pages, push-only against bubbling. Set SWEEP to the
# sizes (e.g. SWEEP="8M 32M 128M 512M"); SWEEP_RATE pages/s (default 16000, below the link);
# the writer first runs long enough to populate its working set.
if [ -n "${SWEEP:-}" ]; then
  SWEEP_RATE=${SWEEP_RATE:-16000}
  printf '\nStress test: one sequential writer at %s pages/s, %s link; faults as %% of the working set\n' "$SWEEP_RATE" "$LINK"
  printf '%-8s %-20s %9s %9s %9s %9s\n' wss order faults percent total_s downtime_ms
  for wss in $SWEEP; do
    bytes=$(numfmt --from=iec "$wss")
    pages=$((bytes / 4096))
    size=$((bytes * 2))
    warm=$(awk -v p="$pages" -v r="$SWEEP_RATE" 'BEGIN{printf "%.1f", p / r + 0.5}')
    for o in "linear|--push linear" "bubbling-7-dual|--push bubbling --pivots 7 --expansion dual"; do
      name=${o%%|*}; flags=${o#*|}
      echo "== stress $wss $name (warm-up ${warm}s)" >&2
      # shellcheck disable=SC2086
      "$BIN" migrate --local --link "$LINK" --transport tcp --size "$size" --wss "$wss" --threads 1 \
        --workload seq --rate "$SWEEP_RATE" --warmup "$warm" --after 0.2 --json --no-progress \
        --strategy postcopy $flags >"$OUT/sweep-$wss-$name.json" 2>"$OUT/sweep-$wss-$name.err" || true
      d=$(dest "$OUT/sweep-$wss-$name.err" || true)
      s="$OUT/sweep-$wss-$name.json"
      if ! jq -e . "$s" >/dev/null 2>&1 || [ -z "$d" ]; then
        printf '%-8s %-20s  failed: %s\n' "$wss" "$name" "$(tail -n 1 "$OUT/sweep-$wss-$name.err")"
        continue
      fi
      f=$(jq -r .demand_requests <<<"$d")
      printf '%-8s %-20s %9s %8.2f%% %9.2f %9.1f\n' "$wss" "$name" "$f" \
        "$(awk -v f="$f" -v p="$pages" 'BEGIN{print 100 * f / p}')" "$(jq -r .total_s "$s")" "$(jq -r .downtime_ms "$s")"
    done
  done
fi
