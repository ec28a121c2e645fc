#!/usr/bin/env bash
# Table 1 of the paper, reproduced on a shaped link: {kvm, ibrahim} x {large working set
# whose dirty rate exceeds the link, small working set}, each a real `livemig migrate --local
# --link RATE` run (two network namespaces joined by a tc-shaped veth pair; needs root).
#
#   bench/precopy-table.sh [LIVEMIG_BIN] ; env: LINK=1gbit SIZE=512M BIG_WSS=256M
#   SMALL_WSS=8M KVM_MAX_TIME=120 RATE=0 (workload pages/s, 0 = flat out)
set -euo pipefail
BIN=${1:-${LIVEMIG_BIN:-target/release/livemig}}
LINK=${LINK:-1gbit}
SIZE=${SIZE:-512M}
BIG_WSS=${BIG_WSS:-256M}
SMALL_WSS=${SMALL_WSS:-8M}
KVM_MAX_TIME=${KVM_MAX_TIME:-120}
RATE=${RATE:-0}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

command -v jq >/dev/null || { echo "needs jq" >&2; exit 1; }
[ -x "$BIN" ] || { echo "no livemig binary at $BIN (cargo build --release -p livemig)" >&2; exit 1; }

for policy in kvm ibrahim; do
  for wss in "$BIG_WSS" "$SMALL_WSS"; do
    extra=()
    [ "$policy" = kvm ] && extra=(--max-time "$KVM_MAX_TIME")
    f="$OUT/$policy-$wss.json"
    echo "== $policy, wss $wss, link $LINK" >&2
    # A kvm abort exits non-zero after printing its summary: keep going.
    "$BIN" migrate --local --link "$LINK" --transport tcp --size "$SIZE" --wss "$wss" \
      --rate "$RATE" --workload random --policy "$policy" "${extra[@]}" --json >"$f" || true
  done
done

printf '\nTable 1 shape: pre-copy on a %s link, %s region, random writer at %s pages/s\n' \
  "$LINK" "$SIZE" "$([ "$RATE" = 0 ] && echo 'flat-out' || echo "$RATE")"
printf '%-8s %-7s %-10s %8s %11s %9s %14s  %s\n' policy wss converged total_s downtime_ms guest_kept ended_at why
for policy in kvm ibrahim; do
  for wss in "$BIG_WSS" "$SMALL_WSS"; do
    f="$OUT/$policy-$wss.json"
    if ! jq -e . "$f" >/dev/null 2>&1; then
      printf '%-8s %-7s %-10s\n' "$policy" "$wss" "run failed"; continue
    fi
    jq -r --arg p "$policy" --arg w "$wss" '
      [ $p, $w,
        (if .outcome == "completed" then "yes" else "NO (aborted)" end),
        (.total_s | . * 10 | round / 10 | tostring),
        (if .downtime_ms == null then "-" else (.downtime_ms | round | tostring) end),
        (if .during_percent_of_before == null then "-" else ((.during_percent_of_before | round | tostring) + "%") end),
        ("interval " + (.iterations | tostring) + " @" +
          ((.intervals[-1].at_ms // 0) / 100 | round / 10 | tostring) + "s"),
        .end_reason ] | @tsv' "$f" |
      awk -F'\t' '{ printf "%-8s %-7s %-10s %8s %11s %9s %14s  %s\n", $1, $2, $3, $4, $5, $6, $7, $8 }'
  done
done
