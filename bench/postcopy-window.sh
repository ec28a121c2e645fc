#!/usr/bin/env bash
# Post-copy fault service latency against the push window: how long a guest thread that
# faults waits (fault read → page installed and the thread woken, measured by the
# destination) while the background push saturates the link, and what the window costs the
# push. Every row is a real `livemig migrate --local --strategy postcopy` (two processes; with
# a LINK other than `none`, two network namespaces joined by a tc-shaped veth pair, needs
# root). The baseline, run in the same script, is a window no push reaches (the push bounded
# only by the transport, as before the window existed); ratios are against it.
#
#   bench/postcopy-window.sh [LIVEMIG_BIN] ; env: LINKS="none 1gbit 10gbit" SIZE=256M
#   WORKLOAD=random RUNS=3 CONFIGS="16/32 16/64 64/128 64/1048576" (batch/window in pages; the last
#   is the baseline)
set -euo pipefail
BIN=${1:-${LIVEMIG_BIN:-target/release/livemig}}
LINKS=${LINKS:-none 1gbit 10gbit}
SIZE=${SIZE:-256M}
WORKLOAD=${WORKLOAD:-random}
RUNS=${RUNS:-3}
CONFIGS=${CONFIGS:-16/32 16/64 64/128 64/1048576}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

command -v jq >/dev/null || { echo "needs jq" >&2; exit 1; }
[ -x "$BIN" ] || { echo "no livemig binary at $BIN (cargo build --release -p livemig)" >&2; exit 1; }
read -r -a configs <<<"$CONFIGS"
base_cfg=${configs[${#configs[@]}-1]}

# The destination's report is the JSON line on stderr that carries demand_requests.
dest() { grep -h '"demand_requests"' "$1" | tail -n 1; }
median() { sort -g | awk '{a[NR]=$1} END{if (NR) print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

for r in $(seq 1 "$RUNS"); do
  for link in $LINKS; do
    for c in "${configs[@]}"; do
      b=${c%/*}; w=${c#*/}
      echo "== link $link, batch $b, window $w (run $r)" >&2
      args=(--local --transport tcp --size "$SIZE" --workload "$WORKLOAD" --warmup 1 --after 0.5
            --json --no-progress --strategy postcopy --push-batch "$b" --push-window "$w")
      [ "$link" = none ] || args+=(--link "$link")
      f="$OUT/$link-${b}_$w-$r"
      "$BIN" migrate "${args[@]}" >"$f.json" 2>"$f.err" || echo "   failed: $(tail -n 1 "$f.err")" >&2
    done
  done
done

printf '\nPost-copy fault service against the push window: %s guest, %s writer, medians of %s run(s)\n' \
  "$SIZE" "$WORKLOAD" "$RUNS"
printf 'baseline: batch/window %s (no window the push reaches)\n' "$base_cfg"
printf '%-7s %-14s %5s %9s %10s %10s %12s %9s %12s\n' link batch/window ok total_s fault_p50 fault_p99 p99_vs_base demands t_vs_base
for link in $LINKS; do
  col() { # config field: median over runs of field $2 (source JSON when $3 = s, else destination)
    for r in $(seq 1 "$RUNS"); do
      f="$OUT/$link-${1/\//_}-$r"
      jq -e . "$f.json" >/dev/null 2>&1 || continue
      if [ "$3" = s ]; then jq -r ".$2" "$f.json"; else dest "$f.err" | jq -r ".$2 // empty"; fi
    done | median
  }
  bp99=$(col "$base_cfg" fault_p99_us d); bt=$(col "$base_cfg" total_s s)
  for c in "${configs[@]}"; do
    ok=0
    for r in $(seq 1 "$RUNS"); do jq -e . "$OUT/$link-${c/\//_}-$r.json" >/dev/null 2>&1 && ok=$((ok + 1)); done
    t=$(col "$c" total_s s); p50=$(col "$c" fault_p50_us d); p99=$(col "$c" fault_p99_us d)
    dm=$(col "$c" demand_requests d)
    ratio() { [ -n "$1" ] && [ -n "$2" ] && awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2fx", a/b}' || echo -; }
    printf '%-7s %-14s %2s/%-2s %9.2f %8.0fµs %8.0fµs %12s %9.0f %12s\n' "$link" "$c" "$ok" "$RUNS" \
      "${t:-0}" "${p50:-0}" "${p99:-0}" "$(ratio "$p99" "$bp99")" "${dm:-0}" "$(ratio "$t" "$bt")"
  done
done
echo "fault service: fault read by the destination's handler → page installed, thread woken (requested pages)"
