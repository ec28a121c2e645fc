#!/usr/bin/env bash
# Many concurrent migrations through one `livemig serve`, between two network namespaces
# (root, iproute2, jq, python3). The daemon runs in namespace "dst"; N `livemig migrate`
# sources run at once in namespace "src", each with its own random writer, each verified.
# Prints per-migration time and throughput, the total, and the slowest migration; then the
# same again while a hostile client in "src" keeps opening garbage, idle and half-open
# connections to the daemon. With SOAK=SECS, also runs back-to-back sessions for that long
# and prints the daemon's resident memory and open files along the way.
#
#   N=50 SIZE=32M WSS=16M RATE=5000 STRATEGY=precopy LINK=10gbit bench/daemon-scale.sh
#   SOAK=600 bench/daemon-scale.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-50}
SIZE=${SIZE:-32M}
WSS=${WSS:-16M}
RATE=${RATE:-5000}
STRATEGY=${STRATEGY:-precopy}
LINK=${LINK:-10gbit}
SOAK=${SOAK:-0}
cargo build --release -q -p livemig
BIN=$PWD/target/release/livemig
OUT=$(mktemp -d)
S=livemig-scale-src-$$ D=livemig-scale-dst-$$
SECRET=$OUT/secret
"$BIN" secret new "$SECRET" 2>/dev/null
DPID=
cleanup() {
  [[ -n $DPID ]] && kill "$DPID" 2>/dev/null || true
  ip netns del "$S" 2>/dev/null || true
  ip netns del "$D" 2>/dev/null || true
}
trap cleanup EXIT INT TERM
ip netns add "$S"; ip netns add "$D"
ip link add lsS$$ netns "$S" type veth peer name lsD$$ netns "$D"
ip -n "$S" addr add 10.78.0.1/24 dev lsS$$; ip -n "$D" addr add 10.78.0.2/24 dev lsD$$
for ns in "$S" "$D"; do ip -n "$ns" link set lo up; done
ip -n "$S" link set lsS$$ up; ip -n "$D" link set lsD$$ up
for pair in "$S lsS$$" "$D lsD$$"; do
  set -- $pair
  ip netns exec "$1" tc qdisc add dev "$2" root tbf rate "$LINK" burst 4mb latency 50ms
done

ip netns exec "$D" "$BIN" serve --listen 10.78.0.2:7879 --secret-file "$SECRET" --max-sessions 200 \
  --stats-every 5 >"$OUT/daemon.out" 2>"$OUT/daemon.err" &
DPID=$!
for _ in $(seq 50); do grep -q listening "$OUT/daemon.out" 2>/dev/null && break; sleep 0.1; done
usage() { echo "rss $(( $(awk '{print $2}' /proc/$DPID/statm) * 4 / 1024 )) MiB, $(ls /proc/$DPID/fd | wc -l) open files"; }
echo "daemon pid $DPID in $D; at start: $(usage)"

round() { # $1 = label
  local label=$1 t0 t1
  t0=$(date +%s.%N)
  for i in $(seq "$N"); do
    ip netns exec "$S" "$BIN" migrate --to 10.78.0.2:7879 --transport tcp --secret-file "$SECRET" \
      --size "$SIZE" --wss "$WSS" --rate "$RATE" --threads 1 --warmup 0.5 --after 0.5 \
      --strategy "$STRATEGY" --json --no-progress >"$OUT/$label-$i.json" 2>"$OUT/$label-$i.err" &
  done
  local fails=0
  for j in $(jobs -p); do [[ $j == "$DPID" || $j == "${HPID:-}" ]] && continue; wait "$j" || fails=$((fails + 1)); done
  t1=$(date +%s.%N)
  local ok=0
  for i in $(seq "$N"); do
    jq -e '.checksum' "$OUT/$label-$i.json" >/dev/null 2>&1 && ok=$((ok + 1))
  done
  echo
  echo "== $label: $N concurrent $STRATEGY migrations of $SIZE (wss $WSS, $RATE pages/s) over a $LINK link"
  printf '%-4s %9s %12s %11s\n' mig total_s MiB_moved MiB/s
  for i in $(seq "$N"); do
    jq -r --arg i "$i" '[ $i, (.total_s|.*100|round/100), ((.bytes // 0)/1048576|.*10|round/10),
      ((.bytes // 0)/1048576/.total_s|.*10|round/10) ] | @tsv' "$OUT/$label-$i.json" 2>/dev/null ||
      printf '%s\tFAILED\n' "$i"
  done | awk -F'\t' '{ printf "%-4s %9s %12s %11s\n", $1, $2, $3, $4 }' | { [[ $N -le 12 ]] && cat || sort -k2 -n | sed -n '1,3p;$p'; }
  jq -s 'map(select(.total_s)) | {n: length, slowest_s: (map(.total_s)|max), mean_s: ((map(.total_s)|add)/length),
      total_mib: ((map(.bytes // 0)|add)/1048576)}' "$OUT"/$label-*.json |
    jq -r --arg wall "$(awk "BEGIN{print $t1 - $t0}")" '"verified \(.n) of '"$N"'; slowest \(.slowest_s*100|round/100) s, mean \(.mean_s*100|round/100) s; \(.total_mib|round) MiB moved in all, \((.total_mib/.slowest_s)*10|round/10) MiB/s over the slowest migration'"'"'s time; round wall time \($wall|tonumber*100|round/100) s (process start to exit, with warm-up and after)"'
  echo "failed processes: $fails, verified summaries: $ok; daemon: $(usage)"
}

round plain

ip netns exec "$S" python3 - "$OUT/hostile.count" <<'EOF' &
import socket, sys, time
n, idle = 0, []
while True:
    for kind in range(4):
        try:
            s = socket.create_connection(("10.78.0.2", 7879), timeout=2)
        except OSError:
            continue
        n += 1
        if kind == 0:
            s.close()
        elif kind == 1:
            s.sendall(b"\xa5" * 64); s.close()
        elif kind == 2:
            s.sendall(b"LMIG\x03\x01"); idle.append(s)
        else:
            idle.append(s)
    if len(idle) > 100:
        for s in idle[:50]: s.close()
        del idle[:50]
    open(sys.argv[1], "w").write(str(n))
    time.sleep(0.02)
EOF
HPID=$!
sleep 1
round hostile
kill $HPID 2>/dev/null || true; wait $HPID 2>/dev/null || true
echo "hostile client: $(cat "$OUT/hostile.count") connections opened during the round;" \
  "daemon log: $(grep -c 'handshake failed' "$OUT/daemon.err" || true) failed handshakes," \
  "$(grep -c 'closed the oldest' "$OUT/daemon.err" || true) evicted"

if [[ $SOAK -gt 0 ]]; then
  echo
  echo "== soak: back-to-back sessions for $SOAK s (4 at a time)"
  end=$(( $(date +%s) + SOAK )); k=0; next=$(date +%s)
  while [[ $(date +%s) -lt $end ]]; do
    for _ in 1 2 3 4; do
      ip netns exec "$S" "$BIN" migrate --to 10.78.0.2:7879 --transport tcp --secret-file "$SECRET" \
        --size "$SIZE" --wss "$WSS" --rate "$RATE" --threads 1 --warmup 0.2 --after 0.2 --no-progress \
        >/dev/null 2>&1 &
    done
    wait $(jobs -p | grep -v "^$DPID\$") 2>/dev/null || true
    k=$((k + 4))
    if [[ $(date +%s) -ge $next ]]; then echo "t+$(( SOAK - (end - $(date +%s)) ))s: $k sessions, $(usage)"; next=$(( $(date +%s) + 30 )); fi
  done
  echo "soak end: $k sessions; $(usage)"
fi
echo "(raw results in $OUT)"
