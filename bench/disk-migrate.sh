#!/usr/bin/env bash
# Live disk migration under a writing client, hybrid (active push / prioritized prefetch)
# against pre-copy rounds (QEMU's block migration), between two network namespaces joined by a
# shaped link (root, iproute2, jq; python3-libnbd and python3-matplotlib are installed if
# missing). For each strategy: a fresh mirror of one base image, PREWRITE MiB modified before
# the migration, the workload (bench/disk-workload.py, a libnbd client: AsyncWR or Bonnie-like)
# writing through NBD, `livemig disk migrate` after WARM seconds; the client follows the disk
# to the destination at the handover. Prints one row per strategy (time, traffic, the client's
# write throughput before/during/after), the ratios, and writes a plot of the client's
# throughput over time (disk-migrate.png in OUT).
#
#   SIZE=1G PREWRITE=256 SPAN=256 LINK=1gbit WORKLOAD=asyncwr bench/disk-migrate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-1G}
PREWRITE=${PREWRITE:-256}     # MiB modified before the migration (the ModifiedSet)
SPAN=${SPAN:-256}             # MiB the workload writes over (after the prewritten range)
LINK=${LINK:-1gbit}
WORKLOAD=${WORKLOAD:-asyncwr}
COMPUTE_MS=${COMPUTE_MS:-20}
WARM=${WARM:-6}
AFTER=${AFTER:-6}
THRESHOLD=${THRESHOLD:-2}
MAX_ROUNDS=${MAX_ROUNDS:-8}
STRATEGIES=${STRATEGIES:-"hybrid precopy"}
OUT=${OUT:-$(mktemp -d)}
PY=/usr/bin/python3
$PY -c 'import nbd, matplotlib' 2>/dev/null || {
  echo "installing python3-libnbd python3-matplotlib" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-libnbd python3-matplotlib >&2
}
cargo build --release -q -p livemig
BIN=$PWD/target/release/livemig
S=livemig-disk-src-$$ D=livemig-disk-dst-$$
SRV= RCV= WL=
cleanup() {
  for p in $SRV $RCV $WL; do kill "$p" 2>/dev/null || true; done
  ip netns del "$S" 2>/dev/null || true
  ip netns del "$D" 2>/dev/null || true
}
trap cleanup EXIT INT TERM
ip netns add "$S"; ip netns add "$D"
ip link add ldS$$ netns "$S" type veth peer name ldD$$ netns "$D"
ip -n "$S" addr add 10.79.0.1/24 dev ldS$$; ip -n "$D" addr add 10.79.0.2/24 dev ldD$$
for ns in "$S" "$D"; do ip -n "$ns" link set lo up; done
ip -n "$S" link set ldS$$ up; ip -n "$D" link set ldD$$ up
ip netns exec "$S" tc qdisc add dev ldS$$ root tbf rate "$LINK" burst 4mb latency 50ms
ip netns exec "$D" tc qdisc add dev ldD$$ root tbf rate "$LINK" burst 4mb latency 50ms

REPO=$PWD
cd "$OUT"
"$BIN" secret new secret >/dev/null 2>&1
echo "base image: $SIZE of random data in $OUT" >&2
head -c "$SIZE" /dev/urandom > base.img

wait_for() { for _ in $(seq 200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done; echo "no '$2' in $1" >&2; cat "$1" >&2; return 1; }

run() { # $1 = strategy
  local st=$1
  rm -f src.img src.img.lmmeta dst.img dst.img.lmmeta src.sock dst.sock src.ctl
  ip netns exec "$S" "$BIN" disk serve --base base.img src.img --socket src.sock --control src.ctl >"$st-serve.out" 2>"$st-serve.err" &
  SRV=$!
  wait_for "$st-serve.out" listening
  qemu-io -f raw -c "write -P 0x5a 0 ${PREWRITE}M" "nbd+unix:///?socket=src.sock" >/dev/null
  ip netns exec "$D" "$BIN" disk receive --base base.img dst.img --listen 10.79.0.2:7881 --secret-file secret \
    --socket dst.sock --json >"$st-receive.out" 2>"$st-receive.err" &
  RCV=$!
  wait_for "$st-receive.out" listening
  local t0; t0=$(date +%s.%N)
  $PY "$REPO/bench/disk-workload.py" --uri "nbd+unix:///?socket=$OUT/src.sock" --next "nbd+unix:///?socket=$OUT/dst.sock" \
    --mode "$WORKLOAD" --offset-mib "$PREWRITE" --span-mib "$SPAN" --compute-ms "$COMPUTE_MS" --duration 600 >"$st-workload.jsonl" &
  WL=$!
  sleep "$WARM"
  local m0 m1; m0=$(date +%s.%N)
  ip netns exec "$S" "$BIN" disk migrate --control src.ctl --to 10.79.0.2:7881 --secret-file secret --strategy "$st" \
    --threshold "$THRESHOLD" --max-rounds "$MAX_ROUNDS" --json >"$st-migrate.json" 2>"$st-migrate.err" || {
      echo "$st: migration failed: $(cat "$st-migrate.err")" >&2; }
  m1=$(date +%s.%N)
  wait_for "$st-receive.out" verified_chunks || true
  sleep "$AFTER"
  kill -TERM "$WL"; wait "$WL" || true; WL=
  kill "$SRV" "$RCV" 2>/dev/null || true; wait "$SRV" "$RCV" 2>/dev/null || true; SRV= RCV=
  # Workload seconds relative to its start; the migration's window in the same clock.
  jq -n --slurpfile w "$st-workload.jsonl" --slurpfile m "$st-migrate.json" --slurpfile r <(grep '^{' "$st-receive.out" | tail -1) \
    --argjson a "$(awk "BEGIN{print $m0 - $t0}")" --argjson b "$(awk "BEGIN{print $m1 - $t0}")" --arg st "$st" '
    def rate(f): ($w | map(select(.dt and f)) ) as $x | if ($x|length) == 0 then 0 else (($x|map(.wrote_mib)|add) / ($x|map(.dt)|add)) end;
    { strategy: $st, total_s: $m[0].total_s, switchover_s: $m[0].switchover_s, handover_ms: $m[0].handover_ms,
      rounds: $m[0].rounds, forced: $m[0].forced,
      traffic_mib: (($m[0].bytes_pushed + $m[0].bytes_pulled) / 1048576),
      pushed_mib: ($m[0].bytes_pushed / 1048576), pulled_mib: ($m[0].bytes_pulled / 1048576),
      pulled_urgent: $m[0].chunks_pulled_urgent, cancelled: ($r[0].pulls_cancelled // 0),
      verified: $m[0].verified_chunks,
      base_mib: (($m[0].base_fetched_bytes + ($r[0].base_fetched_bytes // 0)) / 1048576),
      before: rate(.t <= $a), during: rate(.t > $a and .t <= $b), after: rate(.t > $b),
      window: [$a, $b] }' > "$st-row.json"
}

for st in $STRATEGIES; do
  echo "== $st" >&2
  run "$st"
done

echo
echo "== live disk migration, $WORKLOAD writer over ${SPAN} MiB, ${PREWRITE} MiB modified before, $SIZE disk, $LINK link"
printf '%-8s %8s %9s %10s %10s %8s %9s %7s %8s %9s %9s %9s\n' strategy total_s traffic_MiB pushed_MiB pulled_MiB base_MiB handover rounds verified before during after
for st in $STRATEGIES; do
  jq -r '[.strategy, (.total_s*100|round/100), (.traffic_mib|round), (.pushed_mib|round), (.pulled_mib|round), (.base_mib|round),
    ((.handover_ms|round|tostring) + "ms"), .rounds, .verified, (.before|round), (.during|round), (.after|round)] | @tsv' "$st-row.json" |
    awk -F'\t' '{ printf "%-8s %8s %9s %10s %10s %8s %9s %7s %8s %9s %9s %9s\n", $1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12 }'
done
echo "(base_MiB: read from the base image at both ends during the migration; before/during/after: the client's write"
echo " throughput in MiB/s; during = from 'disk migrate' to the source's release)"
if [[ -f hybrid-row.json && -f precopy-row.json ]]; then
  jq -rn --slurpfile h hybrid-row.json --slurpfile p precopy-row.json '
    "hybrid vs pre-copy: \(($p[0].traffic_mib / $h[0].traffic_mib)*10|round/10)x less traffic, \(($p[0].total_s / $h[0].total_s)*10|round/10)x shorter migration; client writes during the migration at \(($h[0].during / $h[0].before)*100|round) % of before (hybrid), \(($p[0].during / $p[0].before)*100|round) % (pre-copy)"'
fi
$PY - "$OUT" $STRATEGIES <<'EOF'
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out, strategies = sys.argv[1], sys.argv[2:]
fig, ax = plt.subplots(figsize=(9, 4))
for st in strategies:
    w = [json.loads(l) for l in open(f"{out}/{st}-workload.jsonl") if '"dt"' in l]
    row = json.load(open(f"{out}/{st}-row.json"))
    line, = ax.plot([x["t"] for x in w], [x["wrote_mib"] / max(x["dt"], 1e-3) for x in w], label=f"{st} ({row['total_s']:.1f} s, {row['traffic_mib']:.0f} MiB)")
    ax.axvspan(row["window"][0], row["window"][1], alpha=0.12, color=line.get_color())
ax.set_xlabel("seconds since the client started")
ax.set_ylabel("client writes, MiB/s")
ax.set_title("Client write throughput; shaded: migration (request to release)")
ax.legend()
fig.tight_layout()
fig.savefig(f"{out}/disk-migrate.png", dpi=100)
print(f"plot: {out}/disk-migrate.png")
EOF
