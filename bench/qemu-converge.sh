#!/usr/bin/env bash
# A guest whose WSS MiB working set is dirtied flat out, migrated under QEMU's default
# max-bandwidth (128 MiB/s) and downtime-limit (300 ms), four ways, one after another on the
# same guest (each run to a fresh destination QEMU):
#   qemu-default   QEMU's own rule, through livemig, cancelled after MAX_TIME s
#   qemu-postcopy  QEMU direct tcp:, postcopy started after the first pass (libvirt's
#                  --postcopy-after-precopy), driven by a few lines of Python
#   livemig-sc     livemig's controller (ibrahim patterns) raising downtime-limit
#   livemig-pc     livemig's controller starting postcopy
# Prints total time, downtime (QEMU's), whether it converged, and the deciding rule.
#
#   MEM=1024 DATA=768 WSS=400 MAX_TIME=60 bench/qemu-converge.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MEM=${MEM:-1024}
DATA=${DATA:-768}
WSS=${WSS:-400}
MAX_TIME=${MAX_TIME:-60}
MODES=${MODES:-"qemu-default qemu-postcopy livemig-sc livemig-pc"}
cargo build --release -q -p livemig
BIN=$PWD/target/release/livemig
GUEST=$(qemu-patch/guest/build.sh)
OUT=${OUT:-$(mktemp -d)}
cd "$OUT"
"$BIN" secret new secret >/dev/null 2>&1
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

qemu() { # $1 = name, $2 = extra
  qemu-system-x86_64 -accel tcg -M q35 -m "$MEM" -smp 1 -display none -nodefaults -monitor none -no-reboot \
    -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.cpio.gz" \
    -append "console=ttyS0 quiet panic=-1 dirty=$DATA,$WSS,0" -serial "file:$1.serial" \
    -qmp "unix:$1.qmp,server=on,wait=off" $2 2>"$1.err" &
  PIDS+=($!)
  echo $! > "$1.pid"
  for _ in $(seq 100); do [[ -S $1.qmp ]] && return 0; sleep 0.05; done
  echo "QEMU $1 did not start" >&2; return 1
}

postcopy_after_first_pass() { # $1 = src, $2 = dst
  /usr/bin/python3 - "$1.qmp" "$2.qmp" <<'EOF'
import json, socket, sys, time
def conn(p):
    s = socket.socket(socket.AF_UNIX); s.connect(p); f = s.makefile("rw"); f.readline(); return f
def cmd(f, c, a=None):
    f.write(json.dumps({"execute": c, **({"arguments": a} if a else {})}) + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r: return r["return"]
        if "error" in r: raise SystemExit(f"{c}: {r['error']}")
src, dst = conn(sys.argv[1]), conn(sys.argv[2])
for f in (src, dst):
    cmd(f, "qmp_capabilities")
    cmd(f, "migrate-set-capabilities", {"capabilities": [{"capability": "postcopy-ram", "state": True},
                                                         {"capability": "multifd", "state": False}]})
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
cmd(dst, "migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
cmd(src, "migrate", {"uri": f"tcp:127.0.0.1:{port}"})
started = False
while True:
    m = cmd(src, "query-migrate")
    if not started and m.get("ram", {}).get("dirty-sync-count", 0) >= 2:
        cmd(src, "migrate-start-postcopy"); started = True
    if m.get("status") in ("completed", "failed", "cancelled"): break
    time.sleep(0.05)
print(json.dumps({"status": m["status"], "total_ms": m.get("total-time", 0), "downtime_ms": m.get("downtime", 0),
                  "decided_by": "after the first pass", "postcopy": started}))
EOF
}

through_livemig() { # $1 = src, $2 = dst, then migrate flags
  local src=$1 dst=$2; shift 2
  "$BIN" qemu carrier --listen 127.0.0.1:0 --incoming "$OUT/$dst.in" --dst-qmp "$dst.qmp" --secret-file secret \
    --json >"$dst.carrier" 2>"$dst.carrier.err" &
  local cp=$!
  for _ in $(seq 100); do grep -q listening "$dst.carrier" 2>/dev/null && break; sleep 0.05; done
  local addr; addr=$(awk '{print $2; exit}' "$dst.carrier")
  "$BIN" qemu migrate --src-qmp "$src.qmp" --to "$addr" --secret-file secret --socket-dir "$OUT" --json "$@" \
    2>"$dst.migrate.err" || true
  kill "$cp" 2>/dev/null || true; wait "$cp" 2>/dev/null || true
}

qemu g0 ""
echo "guest booting, touching $DATA MiB, then dirtying $WSS MiB flat out ..." >&2
for _ in $(seq 900); do grep -q "DIRTY t=" g0.serial 2>/dev/null && break; sleep 0.2; done
sleep 3
cur=g0 n=0
: > runs.jsonl
for mode in $MODES; do
  n=$((n + 1))
  qemu "g$n" "-incoming defer"
  case $mode in
    qemu-default) r=$(through_livemig "$cur" "g$n" --switchover qemu --max-time "$MAX_TIME") ;;
    qemu-postcopy) r=$(postcopy_after_first_pass "$cur" "g$n") ;;
    livemig-sc) r=$(through_livemig "$cur" "g$n" --switchover stop-and-copy --max-time "$MAX_TIME") ;;
    livemig-pc) r=$(through_livemig "$cur" "g$n" --postcopy --switchover postcopy --max-time "$MAX_TIME") ;;
  esac
  [[ -n $r ]] || r="{\"status\": \"cancelled after $MAX_TIME s (did not converge)\"}"
  echo "$r" | jq -c --arg mode "$mode" '{mode: $mode, status, total_ms, downtime_ms, decided_by, action, postcopy}' | tee -a runs.jsonl >&2
  if echo "$r" | jq -e '.status == "completed"' >/dev/null 2>&1; then
    kill "$(cat "$cur.pid")" 2>/dev/null || true
    cur=g$n
  else
    kill "$(cat "g$n.pid")" 2>/dev/null || true   # not migrated: the guest runs on at the source
  fi
  sleep 2
done
echo
echo "== $WSS MiB dirtied flat out in a ${MEM} MiB guest, QEMU's default bandwidth and downtime limit"
printf '%-14s %-34s %9s %12s  %s\n' mode status total_ms downtime_ms decided
jq -r '[.mode, .status, (.total_ms // "-"), (.downtime_ms // "-"), ((.decided_by // "-") + (if .action then " → " + .action else "" end))] | @tsv' runs.jsonl |
  awk -F'\t' '{ printf "%-14s %-34s %9s %12s  %s\n", $1, $2, $3, $4, $5 }'
echo "(runs in $OUT/runs.jsonl)"
