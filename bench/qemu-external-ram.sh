#!/usr/bin/env bash
# QEMU's RAM moved by QEMU itself vs by livemig (external RAM, QEMU with livemig's patch), side
# by side in one run, on the same guest and workload. The source QEMU runs in one network
# namespace, each destination QEMU and carrier in another, over a veth pair shaped to LINK
# (tc tbf; "none": unshaped, and QEMU's max-bandwidth raised so that it does not cap itself).
# Every QEMU is the patched binary with RAM in a shared memfd; the guest touches DATA MiB and
# then dirties WSS MiB flat out (WSS=0: idle after touching).
#   qemu-tcp       QEMU direct tcp: (pre-copy, its default downtime rule), cancelled after MAX_TIME s
#   qemu-postcopy  QEMU direct tcp:, postcopy started after the first pass
#   lm-precopy     livemig moves the RAM: pre-copy, the ibrahim controller decides (the
#                  guest's writes tracked with userfaultfd write-protect + PAGEMAP_SCAN)
#   lm-precopy-qlog   the same, the writes read from QEMU's own dirty log (x-livemig-dirty-sync)
#   lm-pre-post    livemig: the same pre-copy, handing over to post-copy when the controller decides
#   lm-hybrid      livemig: one pass, then post-copy
#   lm-hybrid-qlog    the same with QEMU's dirty log
#   lm-postcopy    livemig: post-copy at once
# Prints total time, the guest's pause (source STOP to destination RESUME, QEMU's event
# timestamps, for every run; QEMU's own `downtime` figure is kept in runs.jsonl), bytes, and
# livemig's fault service latency at the destination.
#
#   MEM=1024 DATA=768 WSS=400 LINK=1gbit MAX_TIME=60 bench/qemu-external-ram.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MEM=${MEM:-1024}
DATA=${DATA:-768}
WSS=${WSS:-400}
LINK=${LINK:-1gbit}
MAX_TIME=${MAX_TIME:-60}
MODES=${MODES:-"qemu-tcp qemu-postcopy lm-precopy lm-pre-post lm-hybrid lm-postcopy"}
[[ $(id -u) -eq 0 ]] || { echo "needs root (network namespaces)" >&2; exit 1; }
cargo build --release -q -p livemig
BIN=$PWD/target/release/livemig
QEMU=$(qemu-patch/qemu/build.sh)
GUEST=$(qemu-patch/guest/build.sh)
OUT=${OUT:-$(mktemp -d)}
cd "$OUT"
"$BIN" secret new secret >/dev/null 2>&1
S=lmxS$$ D=lmxD$$
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  ip netns del "$S" 2>/dev/null || true
  ip netns del "$D" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM
ip netns add "$S"; ip netns add "$D"
ip link add lxS$$ netns "$S" type veth peer name lxD$$ netns "$D"
ip -n "$S" addr add 10.78.0.1/24 dev lxS$$; ip -n "$D" addr add 10.78.0.2/24 dev lxD$$
for ns in "$S" "$D"; do ip -n "$ns" link set lo up; done
ip -n "$S" link set lxS$$ up; ip -n "$D" link set lxD$$ up
BW=107374182400
if [[ $LINK != none ]]; then
  ip netns exec "$S" tc qdisc add dev lxS$$ root tbf rate "$LINK" burst 4mb latency 50ms
  ip netns exec "$D" tc qdisc add dev lxD$$ root tbf rate "$LINK" burst 4mb latency 50ms
  BW=134217728   # QEMU's default max-bandwidth
fi

qemu() { # $1 = name, $2 = namespace, $3 = extra
  ip netns exec "$2" "$QEMU" -L /usr/share/qemu -L /usr/share/seabios -accel tcg \
    -M q35,memory-backend=mem0 -object "memory-backend-memfd,id=mem0,size=${MEM}M,share=on" -m "$MEM" \
    -smp 1 -display none -nodefaults -monitor none -no-reboot \
    -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.cpio.gz" \
    -append "console=ttyS0 quiet panic=-1 dirty=$DATA,$WSS,0" -serial "file:$1.serial" \
    -qmp "unix:$1.qmp,server=on,wait=off" $3 2>"$1.err" &
  PIDS+=($!)
  echo $! > "$1.pid"
  for _ in $(seq 100); do [[ -S $1.qmp ]] && return 0; sleep 0.05; done
  echo "QEMU $1 did not start" >&2; return 1
}

qemu_direct() { # $1 = src, $2 = dst, $3 = postcopy (0/1)
  /usr/bin/python3 - "$1.qmp" "$2.qmp" "$3" "$BW" "$MAX_TIME" "$DIP" <<'PY'
import json, socket, sys, time
def conn(p):
    s = socket.socket(socket.AF_UNIX); s.connect(p); f = s.makefile("rw"); f.readline(); return f
seen = {}
def cmd(f, c, a=None):
    f.write(json.dumps({"execute": c, **({"arguments": a} if a else {})}) + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "event" in r:  # the guest's STOP at the source, RESUME at the destination
            seen[(id(f), r["event"])] = r["timestamp"]["seconds"] + r["timestamp"]["microseconds"] / 1e6
        if "return" in r: return r["return"]
        if "error" in r: raise SystemExit(f"{c}: {r['error']}")
src, dst = conn(sys.argv[1]), conn(sys.argv[2])
post, bw, max_time, dip = sys.argv[3] == "1", int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
for f in (src, dst):
    cmd(f, "qmp_capabilities")
    cmd(f, "migrate-set-capabilities", {"capabilities": [{"capability": "postcopy-ram", "state": post}]})
cmd(src, "migrate-set-parameters", {"max-bandwidth": bw})
cmd(dst, "migrate-incoming", {"uri": f"tcp:{dip}:7900"})
cmd(src, "migrate", {"uri": f"tcp:{dip}:7900"})
started, t0 = False, time.time()
while True:
    m = cmd(src, "query-migrate")
    if post and not started and m.get("ram", {}).get("dirty-sync-count", 0) >= 2:
        cmd(src, "migrate-start-postcopy"); started = True
    if m.get("status") in ("completed", "failed", "cancelled"): break
    if time.time() - t0 > max_time:
        cmd(src, "migrate_cancel"); m = {"status": f"cancelled after {max_time:.0f} s (did not converge)"}; break
    time.sleep(0.05)
pause = None
if m["status"] == "completed":
    for _ in range(100):
        if cmd(dst, "query-status").get("running") and (id(dst), "RESUME") in seen: break
        time.sleep(0.05)
    if (id(src), "STOP") in seen and (id(dst), "RESUME") in seen:
        pause = (seen[(id(dst), "RESUME")] - seen[(id(src), "STOP")]) * 1e3
print(json.dumps({"status": m["status"], "total_ms": m.get("total-time"), "pause_ms": pause,
                  "qemu_downtime_ms": m.get("downtime"), "bytes": m.get("ram", {}).get("transferred")}))
PY
}

through_livemig() { # $1 = src, $2 = dst, then qemu migrate flags
  local src=$1 dst=$2; shift 2
  ip netns exec "$DNS" "$BIN" qemu carrier --listen "$DIP:7882" --incoming "$OUT/$dst.in" --dst-qmp "$dst.qmp" \
    --secret-file secret --json >"$dst.carrier" 2>"$dst.carrier.err" &
  local cp=$!
  PIDS+=("$cp")
  for _ in $(seq 100); do grep -q listening "$dst.carrier" 2>/dev/null && break; sleep 0.05; done
  ip netns exec "$SNS" "$BIN" qemu migrate --src-qmp "$src.qmp" --to "$DIP:7882" --secret-file secret \
    --socket-dir "$OUT" --ram livemig --max-time "$MAX_TIME" --json ${PUSH_WINDOW:+--push-window "$PUSH_WINDOW"} \
    "$@" 2>"$dst.migrate.err" |
    jq -c '{status, total_ms, pause_ms: .stop_to_resume_ms, bytes: .engine.bytes,
            fault_p50_us: .dest_ram.fault_p50_us, fault_p99_us: .dest_ram.fault_p99_us,
            decided_by: (.engine.decided_by // .engine.end_rule)}' || true
  wait "$cp" 2>/dev/null || true
}

qemu g0 "$S" ""
echo "guest booting, touching $DATA MiB, then dirtying $WSS MiB flat out ..." >&2
for _ in $(seq 900); do grep -q "DIRTY \(t=\|ready\)" g0.serial 2>/dev/null && break; sleep 0.2; done
sleep 3
cur=g0 n=0 cur_ns=$S
: > runs.jsonl
for mode in $MODES; do
  n=$((n + 1))
  # The destination is in the other namespace; after a migration the guest moves back.
  if [[ $cur_ns == "$S" ]]; then DNS=$D SNS=$S DIP=10.78.0.2; else DNS=$S SNS=$D DIP=10.78.0.1; fi
  qemu "g$n" "$DNS" "-incoming defer"
  case $mode in
    qemu-tcp) r=$(qemu_direct "$cur" "g$n" 0 || true) ;;
    qemu-postcopy) r=$(qemu_direct "$cur" "g$n" 1 || true) ;;
    lm-precopy) r=$(through_livemig "$cur" "g$n" --strategy precopy --dirty-log uffd) ;;
    lm-precopy-qlog) r=$(through_livemig "$cur" "g$n" --strategy precopy --dirty-log qemu) ;;
    lm-pre-post) r=$(through_livemig "$cur" "g$n" --strategy precopy --switchover postcopy) ;;
    lm-hybrid) r=$(through_livemig "$cur" "g$n" --strategy hybrid --dirty-log uffd) ;;
    lm-hybrid-qlog) r=$(through_livemig "$cur" "g$n" --strategy hybrid --dirty-log qemu) ;;
    lm-postcopy) r=$(through_livemig "$cur" "g$n" --strategy postcopy) ;;
  esac
  [[ -n $r ]] || r='{"status": "failed"}'
  echo "$r" | jq -c --arg mode "$mode" '{mode: $mode} + .' | tee -a runs.jsonl >&2
  if echo "$r" | jq -e '.status == "completed"' >/dev/null 2>&1; then
    kill "$(cat "$cur.pid")" 2>/dev/null || true
    cur=g$n cur_ns=$DNS
  else
    kill "$(cat "g$n.pid")" 2>/dev/null || true   # not migrated: the guest runs on at the source
  fi
  sleep 2
done
echo
echo "== ${MEM} MiB guest, $DATA MiB touched, $WSS MiB dirtied flat out; link $LINK"
printf '%-16s %-40s %9s %10s %9s %9s %9s  %s\n' mode status total_ms pause_ms MiB p50_us p99_us decided
jq -r '[.mode, .status, (.total_ms // "-" | if type == "number" then floor else . end),
        (.pause_ms // "-" | if type == "number" then (. * 10 | floor) / 10 else . end),
        (if .bytes then (.bytes / 1048576 | floor) else "-" end),
        (.fault_p50_us // "-" | if type == "number" then floor else . end),
        (.fault_p99_us // "-" | if type == "number" then floor else . end), (.decided_by // "-")] | @tsv' runs.jsonl |
  awk -F'\t' '{ printf "%-16s %-40s %9s %10s %9s %9s %9s  %s\n", $1, $2, $3, $4, $5, $6, $7, $8 }'
echo "(runs in $OUT/runs.jsonl)"
