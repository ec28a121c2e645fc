#!/usr/bin/env bash
# A working set the link cannot keep up with (WSS of SIZE dirtied flat out over a LINK-shaped
# veth pair between two network namespaces; needs root), migrated four ways in one run:
#   precopy        the policy's rounds, then stop-and-copy (the baseline)
#   pre→post       the same rounds; when the policy decides, post-copy moves what is still
#                  dirty (--switchover postcopy)
#   hybrid         one pre-copy pass, then post-copy
#   postcopy       post-copy at once
# Prints total time, downtime, rounds and the rule that ended pre-copy.
#
#   bench/precopy-to-postcopy.sh [LIVEMIG_BIN] ; env: LINK=1gbit SIZE=512M WSS=400M POLICY=ibrahim RUNS=1
set -euo pipefail
BIN=${1:-${LIVEMIG_BIN:-target/release/livemig}}
LINK=${LINK:-1gbit}
SIZE=${SIZE:-512M}
WSS=${WSS:-400M}
POLICY=${POLICY:-ibrahim}
RUNS=${RUNS:-1}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
command -v jq >/dev/null || { echo "needs jq" >&2; exit 1; }
[ -x "$BIN" ] || { echo "no livemig binary at $BIN (cargo build --release -p livemig)" >&2; exit 1; }
common=(--local --link "$LINK" --size "$SIZE" --wss "$WSS" --rate 0 --policy "$POLICY" --json --no-progress --max-time 60)
modes=(
  "precopy|--strategy precopy --switchover stop-and-copy"
  "pre→post|--strategy precopy --switchover postcopy"
  "hybrid|--strategy hybrid"
  "postcopy|--strategy postcopy"
)
printf '%-10s %4s %10s %12s %7s  %s\n' mode run total_s downtime_ms rounds "ended by"
for r in $(seq "$RUNS"); do
  for m in "${modes[@]}"; do
    name=${m%%|*} flags=${m#*|}
    # shellcheck disable=SC2086
    if "$BIN" migrate "${common[@]}" $flags >"$OUT/run.json" 2>"$OUT/run.err"; then
      jq -r --arg m "$name" --arg r "$r" '[$m, $r, (.total_s|tostring), ((.downtime_ms // 0)|tostring),
          ((.rounds // .iterations // "-")|tostring), (.decided_by // .end_reason // "-")] | @tsv' "$OUT/run.json" |
        awk -F'\t' '{ printf "%-10s %4s %10.2f %12.1f %7s  %s\n", $1, $2, $3, $4, $5, $6 }'
    else
      printf '%-10s %4s  failed: %s\n' "$name" "$r" "$(tail -1 "$OUT/run.err")"
    fi
  done
done
