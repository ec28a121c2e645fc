#!/usr/bin/env bash
# A QEMU guest that writes its disk flat out (qemu-patch/guest/diskchk.c: 64 KiB O_DIRECT
# blocks over the first SPAN MiB of a SIZE disk, each read back and checked against the
# generation the guest keeps in memory) migrated with its disk between two network namespaces
# joined by a shaped link (root, iproute2, jq, python3), four ways, each on a fresh guest:
#   livemig-hybrid   `livemig qemu migrate --disk`: the disk served by `livemig disk serve`,
#                    pushed while the memory migrates, handed over in QEMU's pre-switchover,
#                    the rest pulled (on demand and hottest first) at the destination
#   livemig-precopy  the same with --disk-strategy precopy (dirty-chunk rounds; the last one
#                    inside QEMU's downtime)
#   mirror-bg        the libvirt way: the guest's disk a local file, QEMU's blockdev-mirror
#                    (sync=full, background) to the destination QEMU's NBD export, migrate
#                    once the job is ready, block-job-cancel in pre-switchover
#   mirror-wb        the same with copy-mode=write-blocking
# QEMU's memory migration runs with QEMU's defaults in every mode. Prints, per mode: total
# time (disk transfer start to the disk wholly at the destination), QEMU's downtime, disk and
# RAM traffic, the guest's disk write throughput before / during / after (sampled from its
# console on the host's clock), and whether the destination's checker found its disk and its
# memory in agreement (BAD lines: none expected).
#
#   SIZE=1024 SPAN=256 LINK=1gbit bench/qemu-disk.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-1024}     # MiB
SPAN=${SPAN:-256}      # MiB the guest writes over
MEM=${MEM:-512}
LINK=${LINK:-1gbit}
WARM=${WARM:-8}
AFTER=${AFTER:-8}
MODES=${MODES:-"livemig-hybrid livemig-precopy mirror-bg mirror-wb"}
PY=/usr/bin/python3
cargo build --release -q -p livemig
BIN=$PWD/target/release/livemig
GUEST=$(qemu-patch/guest/build.sh)
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
S=livemig-qd-src-$$ D=livemig-qd-dst-$$
SA=10.78.0.1 DA=10.78.0.2
PIDS=()
killall_() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; PIDS=(); }
cleanup() {
  killall_
  ip netns del "$S" 2>/dev/null || true
  ip netns del "$D" 2>/dev/null || true
}
trap cleanup EXIT INT TERM
ip netns add "$S"; ip netns add "$D"
ip link add qdS$$ netns "$S" type veth peer name qdD$$ netns "$D"
ip -n "$S" addr add $SA/24 dev qdS$$; ip -n "$D" addr add $DA/24 dev qdD$$
for ns in "$S" "$D"; do ip -n "$ns" link set lo up; done
ip -n "$S" link set qdS$$ up; ip -n "$D" link set qdD$$ up
ip netns exec "$S" tc qdisc add dev qdS$$ root tbf rate "$LINK" burst 4mb latency 50ms
ip netns exec "$D" tc qdisc add dev qdD$$ root tbf rate "$LINK" burst 4mb latency 50ms

cd "$OUT"
"$BIN" secret new secret >/dev/null 2>&1
echo "disk image: $SIZE MiB of random data in $OUT" >&2
head -c "${SIZE}M" /dev/urandom > pristine.img

wait_for() { for _ in $(seq 300); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done; echo "no '$2' in $1" >&2; cat "$1" >&2; return 1; }

qemu() { # $1 = namespace, $2 = name, then extra arguments
  local ns=$1 name=$2; shift 2
  rm -f "$name.qmp"
  ip netns exec "$ns" qemu-system-x86_64 -accel tcg -M q35 -m "$MEM" -smp 1 -display none -nodefaults -monitor none \
    -no-reboot -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.cpio.gz" \
    -append "console=ttyS0 quiet panic=-1 dirty=64,16,0 diskchk=$SPAN,64,0" -serial "file:$name.serial" \
    -qmp "unix:$name.qmp,server=on,wait=off" "$@" 2>"$name.err" &
  PIDS+=($!)
  for _ in $(seq 200); do [[ -S $name.qmp ]] && return 0; sleep 0.05; done
  echo "QEMU $name did not start" >&2; return 1
}

# Samples the guest's write counter (the latest DISKCHK line of either console) on the host's
# clock: "host_time writes" lines.
sampler() { # $1 = source serial, $2 = destination serial, $3 = output
  while true; do
    local w
    w=$(cat "$1" "$2" 2>/dev/null | grep -a '^DISKCHK t=' | sed -n 's/.* writes=\([0-9]*\).*/\1/p' | sort -n | tail -1 || true)
    [[ -n $w ]] && echo "$(date +%s.%N) $w" >> "$3"
    sleep 0.5
  done
}

# MiB/s written by the guest between host times $2 and $3 in samples file $1 (64 KiB blocks).
rate() {
  awk -v a="$2" -v b="$3" '$1 >= a && $1 <= b { if (!n++) { t0 = $1; w0 = $2 } t1 = $1; w1 = $2 }
    END { if (n > 1 && t1 > t0) printf "%.1f", (w1 - w0) * 64 / 1024 / (t1 - t0); else printf "-" }' "$1"
}

mirror() { # $1 = copy mode
  ip netns exec "$S" $PY - src.qmp dst.qmp "$DA" "$1" <<'EOF'
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
host, mode = sys.argv[3], sys.argv[4]
for f in (src, dst):
    cmd(f, "qmp_capabilities")
cmd(dst, "nbd-server-start", {"addr": {"type": "inet", "data": {"host": host, "port": "10809"}}})
cmd(dst, "nbd-server-add", {"device": "disk0", "writable": True})
t0 = time.time()
cmd(src, "blockdev-add", {"driver": "nbd", "node-name": "target", "export": "disk0",
                          "server": {"type": "inet", "host": host, "port": "10809"}})
cmd(src, "blockdev-mirror", {"job-id": "m", "device": "disk0", "target": "target", "sync": "full",
                             "copy-mode": mode})
while not any(j.get("ready") for j in cmd(src, "query-block-jobs")):
    time.sleep(0.1)
ready = time.time() - t0
caps = [{"capability": "pause-before-switchover", "state": True}, {"capability": "events", "state": True}]
cmd(src, "migrate-set-capabilities", {"capabilities": caps})
cmd(dst, "migrate-incoming", {"uri": f"tcp:{host}:10810"})
cmd(src, "migrate", {"uri": f"tcp:{host}:10810"})
copied, switched = 0, False
while True:
    m = cmd(src, "query-migrate")
    if m.get("status") == "pre-switchover" and not switched:
        switched = True
        jobs = cmd(src, "query-block-jobs")
        copied = max([j.get("offset", 0) for j in jobs] + [0])
        cmd(src, "block-job-cancel", {"device": "m"})
        while cmd(src, "query-block-jobs"):
            time.sleep(0.01)
        cmd(src, "migrate-continue", {"state": "pre-switchover"})
    if m.get("status") in ("completed", "failed", "cancelled"):
        break
    time.sleep(0.02)
total = time.time() - t0
cmd(dst, "nbd-server-stop")
print(json.dumps({"status": m["status"], "total_s": total, "ready_s": ready, "downtime_ms": m.get("downtime", 0),
                  "disk_bytes": copied, "ram_bytes": m.get("ram", {}).get("transferred", 0)}))
EOF
}

: > runs.jsonl
for mode in $MODES; do
  rm -f src.img dst.img src.img.lmmeta dst.img.lmmeta src.sock dst.sock src.ctl samples src.serial dst.serial \
    serve.out receive.out carrier.out "$mode".*
  cp pristine.img src.img
  case $mode in
    livemig-*)
      ip netns exec "$S" "$BIN" disk serve src.img --socket src.sock --control src.ctl >serve.out 2>serve.err &
      PIDS+=($!)
      wait_for serve.out listening
      ip netns exec "$D" "$BIN" disk receive dst.img --size "${SIZE}M" --serve-early --listen $DA:7881 \
        --socket dst.sock --secret-file secret --json >receive.out 2>receive.err &
      PIDS+=($!)
      wait_for receive.out serving
      qemu "$S" src -blockdev "driver=nbd,server.type=unix,server.path=src.sock,node-name=disk0" \
        -device virtio-blk-pci,drive=disk0
      ;;
    mirror-*)
      truncate -s "${SIZE}M" dst.img
      qemu "$S" src -blockdev "driver=file,filename=src.img,node-name=file0,cache.direct=off" \
        -blockdev driver=raw,file=file0,node-name=disk0 -device virtio-blk-pci,drive=disk0
      ;;
  esac
  echo "$mode: guest booting ..." >&2
  for _ in $(seq 900); do grep -q "DISKCHK t=" src.serial 2>/dev/null && break; sleep 0.2; done
  sampler src.serial dst.serial samples &
  SP=$!
  PIDS+=($SP)
  sleep "$WARM"
  t0=$(date +%s.%N)
  case $mode in
    livemig-*)
      qemu "$D" dst -blockdev "driver=nbd,server.type=unix,server.path=dst.sock,node-name=disk0" \
        -device virtio-blk-pci,drive=disk0 -incoming defer
      ip netns exec "$D" "$BIN" qemu carrier --listen $DA:7882 --incoming "$OUT/dst.in" --dst-qmp dst.qmp \
        --secret-file secret --json >carrier.out 2>carrier.err &
      PIDS+=($!)
      wait_for carrier.out listening
      t0=$(date +%s.%N)
      ip netns exec "$S" "$BIN" qemu migrate --src-qmp src.qmp --to $DA:7882 --secret-file secret --socket-dir "$OUT" \
        --disk "src.ctl=$DA:7881" --disk-strategy "${mode#livemig-}" --json >"$mode.json" 2>"$mode.err" || true
      t1=$(date +%s.%N)
      jq -c --arg mode "$mode" --argjson t "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')" '{mode: $mode, status, total_s: $t,
        downtime_ms, disk_bytes: ((.disks[0].summary.bytes_pushed // 0) + (.disks[0].summary.bytes_pulled // 0)),
        ram_bytes: .ram_transferred, handover_ms: .disk_handover_ms}' "$mode.json" > "$mode.row" 2>/dev/null ||
        jq -nc --arg mode "$mode" --arg why "$(tail -1 "$mode.err")" '{mode: $mode, status: ("failed: " + $why)}' > "$mode.row"
      ;;
    mirror-*)
      truncate -s "${SIZE}M" dst.img
      qemu "$D" dst -blockdev "driver=file,filename=dst.img,node-name=file0,cache.direct=off" \
        -blockdev driver=raw,file=file0,node-name=disk0 -device virtio-blk-pci,drive=disk0 -incoming defer
      t0=$(date +%s.%N)
      copy=background; [[ $mode == mirror-wb ]] && copy=write-blocking
      r=$(mirror "$copy" 2>"$mode.err") || r=$(jq -nc --arg why "$(tail -1 "$mode.err")" '{status: ("failed: " + $why)}')
      t1=$(date +%s.%N)
      echo "$r" | jq -c --arg mode "$mode" '{mode: $mode} + .' > "$mode.row"
      ;;
  esac
  sleep "$AFTER"
  t2=$(date +%s.%N)
  bad=$(grep -ac 'DISKCHK BAD\|DISKCHK ERROR' dst.serial || true)
  sweeps=$(grep -ac 'DISKCHK sweep=' dst.serial || true)
  jq -c --arg b "$(rate samples "$(awk -v a="$t0" -v w="$WARM" 'BEGIN { printf "%.3f", a - w }')" "$t0")" --arg d "$(rate samples "$t0" "$t1")" \
    --arg a "$(rate samples "$t1" "$t2")" --argjson bad "${bad:-0}" --argjson sw "${sweeps:-0}" \
    '. + {before: $b, during: $d, after: $a, dest_bad: $bad, dest_sweeps: $sw}' "$mode.row" | tee -a runs.jsonl >&2
  kill $SP 2>/dev/null || true
  killall_
  wait 2>/dev/null || true
  sleep 1
done

echo
echo "== a $SIZE MiB disk written over $SPAN MiB flat out by a ${MEM} MiB TCG guest, link $LINK; QEMU's memory defaults"
printf '%-16s %-10s %8s %9s %9s %9s %11s %11s %11s %s\n' mode status total_s downtime disk_MiB ram_MiB \
  wr_before wr_during wr_after "dest check"
jq -r '[.mode, .status, (.total_s // 0), (.downtime_ms // "-"), ((.disk_bytes // 0) / 1048576), ((.ram_bytes // 0) / 1048576),
        .before, .during, .after, "\(.dest_sweeps) sweeps, \(.dest_bad) bad"] | @tsv' runs.jsonl |
  awk -F'\t' '{ printf "%-16s %-10s %8.2f %9s %9.0f %9.0f %11s %11s %11s %s\n", $1, substr($2, 1, 10), $3, $4, $5, $6, $7, $8, $9, $10 }'
echo "(write throughput in MiB/s, the guest's; runs in $OUT/runs.jsonl)"
hy=$(jq -s 'map(select(.mode == "livemig-hybrid" and .status == "completed"))[0]' runs.jsonl)
for base in livemig-precopy mirror-bg mirror-wb; do
  b=$(jq -s --arg m "$base" 'map(select(.mode == $m and .status == "completed"))[0]' runs.jsonl)
  if [[ $hy != null && $b != null ]]; then
    jq -rn --argjson h "$hy" --argjson b "$b" --arg m "$base" \
      '"\($m) / livemig-hybrid: traffic \((($b.disk_bytes + $b.ram_bytes) / ($h.disk_bytes + $h.ram_bytes)) * 100 | floor / 100)x, time \(($b.total_s / $h.total_s) * 100 | floor / 100)x"'
  fi
done
