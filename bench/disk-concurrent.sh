#!/usr/bin/env bash
# N disks migrating live at once between two network namespaces (the storage-transfer paper's
# concurrency experiment): N `disk serve` mirrors of one base image in "src", N `disk receive`
# in "dst", each disk with PREWRITE MiB modified and its own libnbd writer (AsyncWR-like,
# light by default so N writers fit this machine), all `disk migrate` started together over
# one shaped link. Prints per-disk time, traffic and check, and the slowest and total.
#
#   N=10 SIZE=256M PREWRITE=64 SPAN=64 LINK=1gbit STRATEGY=hybrid bench/disk-concurrent.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-10}
SIZE=${SIZE:-256M}
PREWRITE=${PREWRITE:-64}
SPAN=${SPAN:-64}
LINK=${LINK:-1gbit}
STRATEGY=${STRATEGY:-hybrid}
COMPUTE_MS=${COMPUTE_MS:-200}
WARM=${WARM:-3}
PY=/usr/bin/python3
$PY -c 'import nbd' 2>/dev/null || {
  echo "installing python3-libnbd" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-libnbd >&2
}
cargo build --release -q -p livemig
BIN=$PWD/target/release/livemig
REPO=$PWD
OUT=${OUT:-$(mktemp -d)}
S=livemig-dc-src-$$ D=livemig-dc-dst-$$
PIDS=()
WLS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  ip netns del "$S" 2>/dev/null || true
  ip netns del "$D" 2>/dev/null || true
}
trap cleanup EXIT INT TERM
ip netns add "$S"; ip netns add "$D"
ip link add lcS$$ netns "$S" type veth peer name lcD$$ netns "$D"
ip -n "$S" addr add 10.80.0.1/24 dev lcS$$; ip -n "$D" addr add 10.80.0.2/24 dev lcD$$
for ns in "$S" "$D"; do ip -n "$ns" link set lo up; done
ip -n "$S" link set lcS$$ up; ip -n "$D" link set lcD$$ up
ip netns exec "$S" tc qdisc add dev lcS$$ root tbf rate "$LINK" burst 4mb latency 50ms
ip netns exec "$D" tc qdisc add dev lcD$$ root tbf rate "$LINK" burst 4mb latency 50ms
cd "$OUT"
"$BIN" secret new secret >/dev/null 2>&1
head -c "$SIZE" /dev/urandom > base.img
wait_for() { for _ in $(seq 200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done; echo "no '$2' in $1" >&2; return 1; }

for i in $(seq "$N"); do
  ip netns exec "$S" "$BIN" disk serve --base base.img src$i.img --socket src$i.sock --control src$i.ctl >serve$i.out 2>serve$i.err &
  PIDS+=($!)
  ip netns exec "$D" "$BIN" disk receive --base base.img dst$i.img --listen 10.80.0.2:$((7900 + i)) --secret-file secret \
    --socket dst$i.sock --json >receive$i.out 2>receive$i.err &
  PIDS+=($!)
done
for i in $(seq "$N"); do
  wait_for serve$i.out listening; wait_for receive$i.out listening
  qemu-io -f raw -c "write -P $((i % 200 + 1)) 0 ${PREWRITE}M" "nbd+unix:///?socket=src$i.sock" >/dev/null
  $PY "$REPO/bench/disk-workload.py" --uri "nbd+unix:///?socket=$OUT/src$i.sock" --next "nbd+unix:///?socket=$OUT/dst$i.sock" \
    --offset-mib "$PREWRITE" --span-mib "$SPAN" --compute-ms "$COMPUTE_MS" --duration 600 >workload$i.jsonl 2>workload$i.err &
  PIDS+=($!)
  WLS+=($!)
done
sleep "$WARM"
t0=$(date +%s.%N)
MIG=()
for i in $(seq "$N"); do
  ip netns exec "$S" "$BIN" disk migrate --control src$i.ctl --to 10.80.0.2:$((7900 + i)) --secret-file secret \
    --strategy "$STRATEGY" --json >migrate$i.json 2>migrate$i.err &
  MIG+=($!)
done
fails=0
for p in "${MIG[@]}"; do wait "$p" || fails=$((fails + 1)); done
t1=$(date +%s.%N)
# The writers stop (and flush at the destination) before the servers go.
for p in "${WLS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
for p in "${WLS[@]}"; do wait "$p" 2>/dev/null || true; done
echo
echo "== $N disks ($SIZE, $PREWRITE MiB modified, a writer each) migrating at once with $STRATEGY over a $LINK link"
printf '%-5s %8s %12s %9s\n' disk total_s traffic_MiB verified
for i in $(seq "$N"); do
  jq -r --arg i "$i" '[$i, (.total_s*100|round/100), ((.bytes_pushed + .bytes_pulled)/1048576|round), .verified_chunks] | @tsv' migrate$i.json 2>/dev/null ||
    printf '%s\tFAILED: %s\n' "$i" "$(tail -1 migrate$i.err)"
done | awk -F'\t' '{ printf "%-5s %8s %12s %9s\n", $1, $2, $3, $4 }'
jq -s 'map(select(.total_s)) | {n: length, slowest: (map(.total_s)|max), mib: ((map(.bytes_pushed + .bytes_pulled)|add)/1048576)}' migrate*.json |
  jq -r --arg wall "$(awk "BEGIN{print $t1 - $t0}")" '"\(.n) of '"$N"' migrated and checked; slowest \(.slowest*100|round/100) s; \(.mib|round) MiB moved in all, \((.mib/($wall|tonumber))|round) MiB/s over the \($wall|tonumber*100|round/100) s wall time"'
echo "failed: $fails"
