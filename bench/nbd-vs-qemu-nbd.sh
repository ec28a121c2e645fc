#!/usr/bin/env bash
# `livemig disk serve` against `qemu-nbd` serving the same raw image over a unix socket, side
# by side in one run (qemu-utils, libnbd-bin):
#   - sequential read of the whole image with nbdcopy (to /dev/null) and sequential write
#     (nbdcopy from a file);
#   - 4 KiB reads and writes with `qemu-img bench` (queue depth 16), strided across the image
#     (a prime number of 4 KiB steps, wrapping), so consecutive requests hit scattered blocks;
#   - the same for a lazy mirror (`--base`): first read (every chunk fetched from the base)
#     and second read (all local).
# Prints MiB/s (IOPS for 4 KiB) per server and the livemig / qemu-nbd ratio.
#
#   SIZE=1G RUNS=3 COUNT=200000 bench/nbd-vs-qemu-nbd.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-1G}
RUNS=${RUNS:-3}
COUNT=${COUNT:-200000}
cargo build --release -q -p livemig
BIN=$PWD/target/release/livemig
W=$(mktemp -d /var/tmp/livemig-nbd-XXXX)
PID=
cleanup() { [[ -n $PID ]] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT INT TERM
head -c "$SIZE" /dev/urandom >"$W/img"
cp "$W/img" "$W/src"
BYTES=$(stat -c %s "$W/img")
URI="nbd+unix:///?socket=$W/sock"

start() { # $1 = qemu-nbd | livemig | mirror
  rm -f "$W/sock"
  case $1 in
    qemu-nbd) qemu-nbd -f raw -x '' -t -e 16 --socket="$W/sock" "$W/img" & PID=$! ;;
    livemig) "$BIN" disk serve "$W/img" --socket "$W/sock" >/dev/null & PID=$! ;;
    mirror) rm -f "$W/mirror" "$W/mirror.lmmeta"
      "$BIN" disk serve --base "$W/img" "$W/mirror" --socket "$W/sock" >/dev/null & PID=$! ;;
  esac
  for _ in $(seq 100); do [[ -S $W/sock ]] && return; sleep 0.05; done
  echo "server $1 did not start" >&2; exit 1
}
stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; PID=; }

secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N); awk "BEGIN{print $t1 - $t0}"; }
mibs() { awk "BEGIN{printf \"%.0f\", $BYTES / 1048576 / $1}"; }
iops() { # qemu-img bench prints "Run completed in X seconds."
  local out; out=$(qemu-img bench -f raw -c "$COUNT" -d 16 -s 4096 -S $((4096 * 7919)) "$@" "$URI" 2>&1)
  awk -v c="$COUNT" '/Run completed in/ { printf "%.0f", c / $4 }' <<<"$out"
}
median() { sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }

declare -A R
for server in qemu-nbd livemig; do
  for k in seqread seqwrite rand4kread rand4kwrite; do : >"$W/$server.$k"; done
  for _ in $(seq "$RUNS"); do
    start "$server"
    mibs "$(secs nbdcopy "$URI" null:)" >>"$W/$server.seqread"; echo >>"$W/$server.seqread"
    mibs "$(secs nbdcopy "$W/src" "$URI")" >>"$W/$server.seqwrite"; echo >>"$W/$server.seqwrite"
    iops >>"$W/$server.rand4kread"; echo >>"$W/$server.rand4kread"
    iops -w >>"$W/$server.rand4kwrite"; echo >>"$W/$server.rand4kwrite"
    stop
  done
  for k in seqread seqwrite rand4kread rand4kwrite; do R[$server.$k]=$(median <"$W/$server.$k"); done
done
: >"$W/m1"; : >"$W/m2"
for _ in $(seq "$RUNS"); do
  start mirror
  mibs "$(secs nbdcopy "$URI" null:)" >>"$W/m1"; echo >>"$W/m1"
  mibs "$(secs nbdcopy "$URI" null:)" >>"$W/m2"; echo >>"$W/m2"
  stop
done
echo
echo "NBD over a unix socket, $SIZE raw image in /var/tmp (page cache), median of $RUNS runs"
printf '%-34s %12s %12s %8s\n' test qemu-nbd livemig ratio
for k in seqread:MiB/s seqwrite:MiB/s rand4kread:IOPS rand4kwrite:IOPS; do
  key=${k%%:*} unit=${k##*:}
  q=${R[qemu-nbd.$key]} l=${R[livemig.$key]}
  printf '%-34s %12s %12s %8s\n' "$key ($unit)" "$q" "$l" "$(awk "BEGIN{printf \"%.2f\", $l / $q}")"
done
printf '%-34s %12s %12s\n' "mirror 1st read (MiB/s, fetches)" "-" "$(median <"$W/m1")"
printf '%-34s %12s %12s %8s\n' "mirror 2nd read (MiB/s, local)" "${R[qemu-nbd.seqread]}" "$(median <"$W/m2")" \
  "$(awk "BEGIN{printf \"%.2f\", $(median <"$W/m2") / ${R[qemu-nbd.seqread]}}")"
