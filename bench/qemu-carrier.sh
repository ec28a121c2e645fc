#!/usr/bin/env bash
# QEMU's own `tcp:` migration against QEMU migrating through livemig (`livemig qemu migrate`
# + the destination carrier over one authenticated session: the channels' connections are
# handed to QEMU with getfd/fd:, multifd's through x-livemig-channels when QEMU has livemig's
# patch (QEMU=path of qemu-patch/qemu/build.sh's binary), else relayed with splice;
# livemig-relay forces the relay), the
# same guest migrated back and forth on this machine, single channel and multifd. The guest
# (qemu-patch/guest/build.sh) is idle after touching DATA MiB of its MEM MiB. Each run starts
# a fresh destination QEMU; modes are interleaved so drift hits both alike. Prints every run,
# the medians (QEMU's RAM bytes over the time from `migrate` to completion seen on QMP, QEMU's
# downtime) and livemig / tcp.
#
#   MEM=1024 DATA=768 RUNS=5 MULTIFD="0 4" [QEMU=…] bench/qemu-carrier.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MEM=${MEM:-1024}
DATA=${DATA:-768}
RUNS=${RUNS:-5}
MULTIFD=${MULTIFD:-"0 4"}
BW=${BW:-100G}
QEMU=${QEMU:-qemu-system-x86_64}
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
  "$QEMU" -L /usr/share/qemu -L /usr/share/seabios -accel tcg -M q35 -m "$MEM" -smp 1 -display none -nodefaults -monitor none -no-reboot \
    -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.cpio.gz" \
    -append "console=ttyS0 quiet panic=-1 dirty=$DATA,1,1" -serial "file:$1.serial" \
    -qmp "unix:$1.qmp,server=on,wait=off" $2 2>"$1.err" &
  PIDS+=($!)
  echo $! > "$1.pid"
  for _ in $(seq 100); do [[ -S $1.qmp ]] && return 0; sleep 0.05; done
  echo "QEMU $1 did not start: $(cat "$1.err")" >&2; return 1
}

# QEMU's direct tcp: migration, driven over QMP by a few lines of Python (no livemig).
direct() { # $1 = src, $2 = dst, $3 = multifd
  /usr/bin/python3 - "$1.qmp" "$2.qmp" "$3" "$BW" <<'EOF'
import json, socket, sys, time
def conn(p):
    s = socket.socket(socket.AF_UNIX); s.connect(p); f = s.makefile("rw"); f.readline()
    return f
def cmd(f, c, a=None):
    f.write(json.dumps({"execute": c, **({"arguments": a} if a else {})}) + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r: return r["return"]
        if "error" in r: raise SystemExit(f"{c}: {r['error']}")
src, dst, mf, bw = conn(sys.argv[1]), conn(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
bw = int(bw[:-1]) * units[bw[-1]] if bw[-1] in units else int(bw)
for f in (src, dst):
    cmd(f, "qmp_capabilities")
    cmd(f, "migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": mf > 0}]})
    p = {"max-bandwidth": bw}
    if mf: p["multifd-channels"] = mf
    cmd(f, "migrate-set-parameters", p)
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
cmd(dst, "migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
t0 = time.monotonic()
cmd(src, "migrate", {"uri": f"tcp:127.0.0.1:{port}"})
while True:
    m = cmd(src, "query-migrate")
    if m.get("status") in ("completed", "failed", "cancelled"): break
    time.sleep(0.01)
wall = (time.monotonic() - t0) * 1000
print(json.dumps({"status": m["status"], "total_ms": m.get("total-time", 0), "downtime_ms": m.get("downtime", 0),
                  "wall_ms": round(wall), "ram_transferred": m.get("ram", {}).get("transferred", 0)}))
EOF
}

through_livemig() { # $1 = src, $2 = dst, $3 = multifd, then extra flags
  "$BIN" qemu carrier --listen 127.0.0.1:0 --incoming "$OUT/$2.in" --dst-qmp "$2.qmp" --secret-file secret \
    --json >"$2.carrier" 2>"$2.carrier.err" &
  local cp=$!
  for _ in $(seq 100); do grep -q listening "$2.carrier" 2>/dev/null && break; sleep 0.05; done
  local addr; addr=$(awk '{print $2; exit}' "$2.carrier")
  "$BIN" qemu migrate --src-qmp "$1.qmp" --to "$addr" --secret-file secret --multifd "$3" --max-bandwidth "$BW" \
    --socket-dir "$OUT" --json "${@:4}" 2>"$2.migrate.err"
  wait "$cp" || true
}

n=0
qemu g0 ""
echo "guest booting and touching $DATA MiB ..." >&2
for _ in $(seq 600); do grep -q "DIRTY t=" g0.serial 2>/dev/null && break; sleep 0.2; done
cur=g0
: > runs.jsonl
for run in $(seq "$RUNS"); do
  for mf in $MULTIFD; do
    modes="tcp livemig livemig-relay"
    for mode in $modes; do
      n=$((n + 1))
      qemu "g$n" "-incoming defer"
      case $mode in
        tcp) r=$(direct "$cur" "g$n" "$mf") ;;
        livemig) r=$(through_livemig "$cur" "g$n" "$mf") ;;
        livemig-relay) r=$(through_livemig "$cur" "g$n" "$mf" --relay) ;;
      esac
      if echo "$r" | jq -e '.status == "completed"' >/dev/null 2>&1; then
        old=$(cat "$cur.pid"); cur=g$n
      else
        old=$(cat "g$n.pid")   # not migrated: the guest runs on where it was
      fi
      kill "$old" 2>/dev/null || true
      while kill -0 "$old" 2>/dev/null; do sleep 0.1; done
      sleep 1
      echo "${r:-{\"status\": \"no result\"\}}" | jq -c --arg mode "$mode" --argjson mf "$mf" --argjson run "$run" \
        '{mode: $mode, multifd: $mf, run: $run, status, wall_ms, total_ms, downtime_ms, ram_transferred, handoff,
          mib_s: (if (.wall_ms // 0) > 0 then .ram_transferred / 1048576 / (.wall_ms / 1000) else null end)}' | tee -a runs.jsonl >&2
    done
  done
done

echo
echo "== QEMU migration of an idle ${MEM} MiB guest holding $DATA MiB: direct tcp: vs through livemig (medians of $RUNS)"
printf '%-8s %8s %9s %10s %12s %9s\n' mode multifd MiB/s wall_ms downtime_ms RAM_MiB
jq -s -r 'map(select(.status == "completed" and .mib_s != null)) | group_by([.multifd, .mode]) | .[] | (map(.mib_s)|sort) as $r | (map(.wall_ms)|sort) as $t | (map(.downtime_ms)|sort) as $d |
  [.[0].mode, .[0].multifd, ($r[($r|length)/2|floor]|round), $t[($t|length)/2|floor], $d[($d|length)/2|floor],
   (.[0].ram_transferred/1048576|round)] | @tsv' runs.jsonl | awk -F'\t' '{ printf "%-8s %8s %9s %10s %12s %9s\n", $1,$2,$3,$4,$5,$6 }'
jq -s -r 'map(select(.status == "completed" and .mib_s != null)) | group_by(.multifd) | .[] | (map(select(.mode=="tcp").mib_s)|sort) as $a | (map(select(.mode=="livemig").mib_s)|sort) as $b |
  (map(select(.mode=="livemig-relay").mib_s)|sort) as $c |
  "multifd \(.[0].multifd): livemig / direct tcp = \((($b[($b|length)/2|floor]) / ($a[($a|length)/2|floor]))*100|round/100)" +
  (if ($c|length) > 0 then ", relayed / direct tcp = \((($c[($c|length)/2|floor]) / ($a[($a|length)/2|floor]))*100|round/100)" else "" end)' runs.jsonl
echo "QEMU: $("$QEMU" --version | head -1) ($QEMU); livemig runs handed the connections over: $(jq -s '[.[] | select(.mode == "livemig" and .handoff == true)] | length' runs.jsonl) of $(jq -s '[.[] | select(.mode == "livemig")] | length' runs.jsonl)"
echo "runs left out (not completed): $(jq -s 'map(select(.status != "completed" or .mib_s == null)) | length' runs.jsonl) (runs in $OUT/runs.jsonl)"
