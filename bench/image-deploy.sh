#!/usr/bin/env bash
# The lazy-deployment paper's experiments (Fig. 3–6 shapes) on this machine, with real QEMU
# guests and a real S3 server:
#
#  - a storage "host" (network namespace) runs s3s-fs holding the image repository; its one
#    link to the switch is shaped to LINK (the shared bottleneck, as a storage server's NIC);
#  - N compute "hosts" (namespaces on the same switch) each boot the project's test guest from
#    one repository image, an ext4 file system of IMG_SIZE holding FILL_MIB of the host's
#    /usr/bin and libraries; the guest reads the files in /boot.list (BOOT_MIB of binaries and libraries
#    spread over the file system: a boot-like pattern), writes a WRITE_MIB file and syncs;
#  - lazy: `livemig image serve` on each host, QEMU on its NBD socket (chunks fetched on first
#    touch); pre-propagation: `livemig image export` of the whole image to each host first, then
#    QEMU on the local copy;
#  - snapshot (after each lazy run of the first chunk size, so for every N): the N lazy
#    instances CLONE then COMMIT at once, against copying a full image per
#    instance into the repository (N concurrent `image push` of one instance's whole disk, read
#    once through NBD: the same bytes to move and store as N different full copies, without N
#    local copies on this machine's disk).
#
# Traffic is the storage link's transmitted bytes (its counter); times are wall-clock from the
# moment all hosts start. Prints tables and writes results.tsv/snapshot.tsv (+ deploy.png and
# snapshot.png with matplotlib) in OUT.
#
#   NS="1 4 10" CHUNKS="256K 512K 1M" LINK=1gbit IMG_SIZE=1G FILL_MIB=560 BOOT_MIB=64 bench/image-deploy.sh
# (disk space: the cached image, one stored copy per chunk size, and N local copies at once
# for pre-propagation)
set -euo pipefail
cd "$(dirname "$0")/.."
NS=${NS:-"1 4 10"}
CHUNKS=${CHUNKS:-256K}
LINK=${LINK:-1gbit}
IMG_SIZE=${IMG_SIZE:-1G}
FILL_MIB=${FILL_MIB:-560}
BOOT_MIB=${BOOT_MIB:-64}
PACK=${PACK:-4M}
WRITE_MIB=${WRITE_MIB:-1}
MEM=${MEM:-256M}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-300}
MODES=${MODES:-"prepro lazy"}
command -v s3s-fs >/dev/null || PATH=$PATH:${CARGO_HOME:-$HOME/.cargo}/bin
command -v s3s-fs >/dev/null || { echo "s3s-fs is missing (scripts/install-deps.sh)" >&2; exit 1; }
cargo build --release -q -p livemig
BIN=$PWD/target/release/livemig
GUEST=$(qemu-patch/guest/build.sh)
CACHE=${CACHE:-$PWD/target/image-bench}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$CACHE"
TAG=$$
SW=lmsw$TAG ST=lmst$TAG
MAXN=0; for n in $NS; do ((n > MAXN)) && MAXN=$n; done
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for i in $(seq "$MAXN"); do ip netns del "lmh$TAG-$i" 2>/dev/null || true; done
  ip netns del "$ST" 2>/dev/null || true
  ip netns del "$SW" 2>/dev/null || true
}
trap cleanup EXIT INT TERM

# The image: ext4 holding /usr/bin and the libraries, and the boot list (every k-th file, by
# name, until BOOT_MIB).
IMG=$CACHE/os-$IMG_SIZE-$FILL_MIB-$BOOT_MIB.img
if [[ ! -s $IMG ]]; then
  echo "building $IMG" >&2
  TREE=$(mktemp -d)
  mkdir -p "$TREE/var/log"
  (cd / && find usr/bin usr/lib/x86_64-linux-gnu -type f -printf '%p %s\n' | LC_ALL=C sort |
    awk -v b=$((FILL_MIB << 20)) 'sum < b { print $1; sum += $2 }' | cpio -pdm --quiet "$TREE")
  (cd "$TREE" && find usr -type f -size +4k -printf '/%p %s\n' | LC_ALL=C sort) |
    awk -v budget=$((BOOT_MIB << 20)) 'NR % 7 == 0 && sum < budget { print $1; sum += $2 }' > "$TREE/boot.list"
  truncate -s "$IMG_SIZE" "$IMG.tmp"
  mkfs.ext4 -q -F -d "$TREE" "$IMG.tmp"
  cp "$TREE/boot.list" "$IMG.boot.list"
  rm -rf "$TREE"
  mv "$IMG.tmp" "$IMG"
fi
IMG_BYTES=$(stat -c %s "$IMG")

# The network: a switch namespace with a bridge; the storage host and N compute hosts on it.
ip netns add "$SW"; ip -n "$SW" link set lo up
ip -n "$SW" link add br0 type bridge; ip -n "$SW" link set br0 up
ip netns add "$ST"; ip -n "$ST" link set lo up
ip link add lst$TAG netns "$ST" type veth peer name sst$TAG netns "$SW"
ip -n "$SW" link set sst$TAG master br0 up
ip -n "$ST" addr add 10.81.0.1/24 dev lst$TAG; ip -n "$ST" link set lst$TAG up
ip netns exec "$ST" tc qdisc add dev lst$TAG root tbf rate "$LINK" burst 4mb latency 100ms
for i in $(seq "$MAXN"); do
  h=lmh$TAG-$i
  ip netns add "$h"; ip -n "$h" link set lo up
  ip link add lh$TAG-$i netns "$h" type veth peer name sh$TAG-$i netns "$SW"
  ip -n "$SW" link set sh$TAG-$i master br0 up
  ip -n "$h" addr add 10.81.0.$((10 + i))/24 dev lh$TAG-$i; ip -n "$h" link set lh$TAG-$i up
done
tx() { ip netns exec "$ST" cat /sys/class/net/lst$TAG/statistics/tx_bytes; }

cd "$OUT"
mkdir -p s3root/livemig
ip netns exec "$ST" s3s-fs --host 10.81.0.1 --port 9000 --access-key livemig --secret-key livemig-bench-secret s3root >s3.log 2>&1 &
PIDS+=($!)
export AWS_ENDPOINT=http://10.81.0.1:9000 AWS_ACCESS_KEY_ID=livemig AWS_SECRET_ACCESS_KEY=livemig-bench-secret AWS_REGION=us-east-1
export LIVEMIG_REPO=s3://livemig/images
for _ in $(seq 100); do ip netns exec "$ST" bash -c 'echo >/dev/tcp/10.81.0.1/9000' 2>/dev/null && break; sleep 0.1; done
for c in $CHUNKS; do
  ip netns exec "$ST" "$BIN" image push "$IMG" "os-$c" --chunk-size "$c" --pack-size "$PACK" --json >"push-$c.json"
done
STORED=$(jq -s 'map(.summary.bytes_written) | max' push-*.json)
echo "image: $IMG_BYTES bytes, $((STORED >> 20)) MiB stored per chunk size; boot list $(wc -l <"$IMG.boot.list") files, ~$BOOT_MIB MiB" >&2

now() { date +%s.%N; }
wait_boot() { # $1 serial file; prints seconds since $2 when BOOTED appears
  local t=0
  while ! grep -q '^BOOTED' "$1" 2>/dev/null; do
    grep -q 'BOOT mount' "$1" 2>/dev/null && { echo "FAILED"; return; }
    sleep 0.1; t=$((t + 1)); ((t > BOOT_TIMEOUT * 10)) && { echo "TIMEOUT"; return; }
    true
  done
  awk -v a="$(now)" -v b="$2" 'BEGIN { printf "%.2f\n", a - b }'
}
qemu() { # $1 host ns, $2 name, then drive args
  local h=$1 name=$2; shift 2
  ip netns exec "$h" qemu-system-x86_64 -accel tcg -M q35 -m "$MEM" -smp 1 -display none -nodefaults -monitor none \
    -no-reboot -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.cpio.gz" \
    -append "console=ttyS0 quiet panic=-1 no_timer_check boot=$WRITE_MIB" -serial "file:$name.serial" "$@" 2>"$name.qemu.err" &
  echo $!
}

host_lazy() { # $1 i, $2 chunk, $3 t0, $4 run
  local i=$1 h=lmh$TAG-$1 name=$4-h$1
  rm -f "$name".img "$name".img.lm*
  ip netns exec "$h" "$BIN" image serve "os-$2" --local "$name.img" --socket "$name.sock" --control "$name.ctl" \
    >"$name.serve.out" 2>"$name.serve.err" &
  echo $! >"$name.pids"
  for _ in $(seq 200); do grep -q listening "$name.serve.out" 2>/dev/null && break; sleep 0.05; done
  qemu "$h" "$name" -blockdev "driver=nbd,server.type=unix,server.path=$name.sock,node-name=d0" \
    -device virtio-blk-pci,drive=d0 >>"$name.pids"
  wait_boot "$name.serial" "$3" >"$name.boot"
}

host_prepro() { # $1 i, $2 chunk, $3 t0, $4 run
  local i=$1 h=lmh$TAG-$1 name=$4-h$1
  ip netns exec "$h" "$BIN" image export "os-$2" "$name.raw" --json >"$name.export.json" 2>"$name.export.err"
  awk -v a="$(now)" -v b="$3" 'BEGIN { printf "%.2f\n", a - b }' >"$name.copied"
  qemu "$h" "$name" -drive "file=$name.raw,format=raw,if=none,id=d0" -device virtio-blk-pci,drive=d0 >"$name.pids"
  wait_boot "$name.serial" "$3" >"$name.boot"
}

stop_run() { # $1 run, $2 N
  for i in $(seq "$2"); do
    for p in $(cat "$1-h$i.pids" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
  done
  sleep 1
  rm -f "$1"-h*.raw
}

# Snapshot: CLONE + COMMIT on every lazy instance of a run at once, vs pushing each full
# image; one pair of rows per N (appended to snapshot.tsv).
snapshot() { # $1 run, $2 N
  local run=$1 n=$2 c=${CHUNKS%% *} i du0 du1 du2 du3 t0 t1 t2 t3 committed
  local SP=()
  du0=$(du -sb --apparent-size s3root/livemig | cut -f1)
  t0=$(now)
  for i in $(seq "$n"); do
    ( ip netns exec "lmh$TAG-$i" "$BIN" image clone "os-$c" "snap$TAG-$n-$i" --control "$run-h$i.ctl" --json >"snap-$n-h$i.clone" &&
      ip netns exec "lmh$TAG-$i" "$BIN" image commit "snap$TAG-$n-$i" --control "$run-h$i.ctl" --json >"snap-$n-h$i.commit" ) &
    SP+=($!)
  done
  wait "${SP[@]}" || echo "a snapshot failed (snap-$n-h*.clone/commit)" >&2
  t1=$(now)
  du1=$(du -sb --apparent-size s3root/livemig | cut -f1)
  committed=$(cat snap-"$n"-h*.commit | jq -s 'map(.chunks_written) | add')
  # Baseline: a full copy per instance pushed into the repository as a new image, all at once
  # (instance 1's whole disk stands for every instance's: the same bytes to move and store).
  nbdcopy "nbd+unix:///?socket=$OUT/$run-h1.sock" full.raw
  du2=$(du -sb --apparent-size s3root/livemig | cut -f1)
  t2=$(now)
  SP=()
  for i in $(seq "$n"); do
    ip netns exec "lmh$TAG-$i" "$BIN" image push full.raw "full$TAG-$n-$i" --chunk-size "$c" --json >"full-$n-h$i.push" &
    SP+=($!)
  done
  wait "${SP[@]}" || echo "a full push failed (full-$n-h*.push)" >&2
  t3=$(now)
  du3=$(du -sb --apparent-size s3root/livemig | cut -f1)
  rm -f full.raw
  awk -v n="$n" -v t="$(awk -v a="$t1" -v b="$t0" 'BEGIN{print a-b}')" -v d=$((du1 - du0)) -v k="$committed" \
    'BEGIN { printf "clone+commit\t%d\t%.2f\t%.1f\t%.2f\t%d\n", n, t, d / 1048576, d / 1048576 / n, k }' >>snapshot.tsv
  awk -v n="$n" -v t="$(awk -v a="$t3" -v b="$t2" 'BEGIN{print a-b}')" -v d=$((du3 - du2)) \
    'BEGIN { printf "full copy\t%d\t%.2f\t%.1f\t%.2f\t-\n", n, t, d / 1048576, d / 1048576 / n }' >>snapshot.tsv
  tail -2 snapshot.tsv >&2
}

printf 'method\tN\ttime_s\tstorage_added_mib\tper_instance_mib\tchunks_committed\n' >snapshot.tsv
printf 'chunk\tmode\tN\tfirst_boot_s\tlast_boot_s\tcopy_s\ttraffic_mib\tpct_of_image\tbooted\n' >results.tsv
for c in $CHUNKS; do
  for n in $NS; do
    for mode in $MODES; do
      run=$mode-$c-$n
      b0=$(tx); t0=$(now)
      for i in $(seq "$n"); do "host_$mode" "$i" "$c" "$t0" "$run" & done
      for i in $(seq "$n"); do
        while [[ ! -s $run-h$i.boot ]]; do sleep 0.2; done
      done
      b1=$(tx)
      boots=$(cat "$run"-h*.boot | tr '\n' ' ')
      ok=$(cat "$run"-h*.boot | grep -c '^[0-9]' || true)
      first=$(printf '%s\n' $boots | grep '^[0-9]' | sort -n | head -1 || true)
      last=$(printf '%s\n' $boots | grep '^[0-9]' | sort -n | tail -1 || true)
      copy=$(cat "$run"-h*.copied 2>/dev/null | sort -n | tail -1 || true)
      mib=$(( (b1 - b0) >> 20 ))
      pct=$(awk -v b=$((b1 - b0)) -v s="$IMG_BYTES" -v n="$n" 'BEGIN { printf "%.1f", 100 * b / s / n }')
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s/%s\n' "$c" "$mode" "$n" "${first:-}" "${last:-}" "${copy:--}" "$mib" "$pct" "$ok" "$n" >>results.tsv
      tail -1 results.tsv >&2
      # Every lazy run of the first chunk size is snapshotted before it stops.
      if [[ $mode == lazy && $c == "${CHUNKS%% *}" ]]; then snapshot "$run" "$n"; fi
      stop_run "$run" "$n"
    done
  done
done

echo
echo "== deployment: $MAXN hosts at most, image $((IMG_BYTES >> 20)) MiB ($((STORED >> 20)) MiB stored), link $LINK shared at the storage host"
echo "   traffic: bytes the storage link sent; pct: per host, of the image size"
column -t -s $'\t' results.tsv
if [[ $(wc -l <snapshot.tsv) -gt 1 ]]; then
  echo
  echo "== snapshot: every lazy instance CLONE + COMMIT at once (each wrote $WRITE_MIB MiB plus what its boot wrote; ${CHUNKS%% *} chunks), vs a full copy per instance"
  column -t -s $'\t' snapshot.tsv
  awk -F'\t' '$1 == "clone+commit" { a[$2] = $3; s[$2] = $4 } $1 == "full copy" && a[$2] > 0 && s[$2] > 0 {
    printf "N=%s: full copy / clone+commit %.1fx the time, %.1fx the storage\n", $2, $3 / a[$2], $4 / s[$2] }' snapshot.tsv
fi

/usr/bin/python3 -c 'import matplotlib' 2>/dev/null || {
  echo "installing python3-matplotlib (for the plot)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-matplotlib >&2 || true
}
/usr/bin/python3 - "$OUT" <<'PY' || echo "no plot (python3-matplotlib missing)" >&2
import csv, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out = sys.argv[1]
rows = list(csv.DictReader(open(f"{out}/results.tsv"), delimiter="\t"))
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
for (chunk, mode) in sorted({(r["chunk"], r["mode"]) for r in rows}):
    rs = sorted((r for r in rows if r["chunk"] == chunk and r["mode"] == mode and r["last_boot_s"]), key=lambda r: int(r["N"]))
    n = [int(r["N"]) for r in rs]
    label = f"{'lazy' if mode == 'lazy' else 'pre-propagation'} {chunk}"
    a.plot(n, [float(r["last_boot_s"]) for r in rs], marker="o", label=label)
    b.plot(n, [float(r["traffic_mib"]) for r in rs], marker="o", label=label)
a.set_xlabel("hosts"); a.set_ylabel("last guest booted (s)"); a.legend()
b.set_xlabel("hosts"); b.set_ylabel("storage link traffic (MiB)"); b.legend()
fig.tight_layout()
fig.savefig(f"{out}/deploy.png", dpi=100)
print(f"plot: {out}/deploy.png")
snaps = list(csv.DictReader(open(f"{out}/snapshot.tsv"), delimiter="\t"))
if snaps:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for method in ("clone+commit", "full copy"):
        rs = sorted((r for r in snaps if r["method"] == method), key=lambda r: int(r["N"]))
        n = [int(r["N"]) for r in rs]
        a.plot(n, [float(r["time_s"]) for r in rs], marker="o", label=method)
        b.plot(n, [float(r["storage_added_mib"]) for r in rs], marker="o", label=method)
    a.set_xlabel("instances"); a.set_ylabel("snapshot time (s)"); a.legend()
    b.set_xlabel("instances"); b.set_ylabel("storage added (MiB)"); b.set_yscale("log"); b.legend()
    fig.tight_layout()
    fig.savefig(f"{out}/snapshot.png", dpi=100)
    print(f"plot: {out}/snapshot.png")
PY
echo "results in $OUT"
