#!/usr/bin/env bash
# harness.sh — (livemig tests/rxe) run a host-built binary inside a throw-away qemu guest that has a
# Soft-RoCE (rdma_rxe) device "rxe0", and hand back its stdout, stderr and exit code.
#
#   usage: harness.sh [--] <host-binary-or-script> [args...]
#
# The guest is the host's own Debian kernel (/boot/vmlinuz-$KVER) booted under qemu
# (TCG by default) with a busybox initramfs built by build-initramfs.sh. The binary and
# its shared-library closure (ldd) are appended to that initramfs as a second cpio
# archive, so it runs against exactly the host's libibverbs / rxe provider.
# The guest has NO network card (-nodefaults, no -netdev): rxe0 sits on "lo"
# (or on a guest-only dummy0), so no packet can leave the guest.
#
# Inside the guest: cwd=/tmp (tmpfs), user root, ulimit -l unlimited, rxe0 port 1 ACTIVE,
# GID index 1 = ::ffff:127.0.0.1 (RoCE v2) on lo, so peers connect to 127.0.0.1
# (dummy mode: ::ffff:169.254.77.1). /run/rxe-netdev holds the netdev name.
# The binary lands in /harness/bin (on PATH) and is exec'd by busybox sh, so a script
# argument runs under busybox. ibv_devinfo, ibv_*_pingpong, ib_*_bw/lat, rdma, ip are there.
#
# Exit status: the binary's own exit status (128+N if killed by signal N);
#   124 = timed out; 125 = harness/guest failure (no exit marker; console log printed);
#   200 = rxe0 could not be created in the guest.
#
# Environment knobs (all optional):
#   RXE_HARNESS_TIMEOUT=600     wall-clock limit for the whole guest run, seconds
#   RXE_HARNESS_ACCEL=auto      auto | tcg | kvm  (auto = kvm only if /dev/kvm is usable, the CPU
#                               has vmx/svm and the host is not KVM_PVM; otherwise tcg)
#   RXE_HARNESS_CPU=qemu64      qemu -cpu model. qemu64 (x86-64 baseline, SSE2) runs rxe ~2x
#                               faster under TCG than "max" (glibc picks AVX2 memcpy, slow to
#                               emulate); use max for binaries built with target-cpu=native
#   RXE_HARNESS_PVH=1           0: boot the compressed bzImage instead of the PVH vmlinux
#   RXE_HARNESS_MEM=2G  RXE_HARNESS_SMP=2
#   RXE_HARNESS_NETDEV=lo       lo | dummy. lo: GID 1 = ::ffff:127.0.0.1, raw verbs only
#                               (rdma_cm's rdma_resolve_route fails on loopback addresses).
#                               dummy: a guest-only dummy0 with 169.254.77.1/16, MTU 9000;
#                               raw verbs AND rdma_cm work (connect to 169.254.77.1)
#   RXE_HARNESS_ADDR=           override dummy0's address (ip/len)
#   RXE_HARNESS_MTU=            netdev MTU (rxe active_mtu = largest IB MTU <= it, max 4096;
#                               a 1500 MTU gives 1024)
#   RXE_HARNESS_HUGEPAGES=N     reserve N 2 MiB hugepages in the guest (hugetlbfs on /dev/hugepages)
#   RXE_HARNESS_FILES="a b:/guest/path ..."  extra host files to copy in (ELF: with libs);
#                               default guest path: /harness/bin/<basename>
#   RXE_HARNESS_SHARE=/dir      share a host dir read-only over virtio-9p at the same path
#   RXE_HARNESS_ENV="VAR ..."   extra env var names to pass through (RUST_BACKTRACE,
#                               LIVEMIG_LOG, RUST_LOG, RUST_TEST_THREADS, RUST_MIN_STACK always are)
#   RXE_HARNESS_STRIP=0         1: strip debug info from the copied binary (smaller cpio)
#   RXE_HARNESS_VERBOSE=0       1: echo the guest console (kernel + init log) to stderr
#   RXE_HARNESS_KEEP=0          1: keep the per-run work dir (printed on stderr)
#   RXE_HARNESS_TIMING=         1: print prep / qemu / total wall-clock on stderr
#   RXE_HARNESS_SHELL=          1: interactive busybox shell on this terminal instead of running
#                               the binary (it is in /harness/bin; exit or Ctrl-D powers off)
#   RXE_HARNESS_OUT=<dir>/out          where base.cpio / vmlinuz live (auto-built)
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ ${1:-} == -- ]] && shift
if [[ $# -lt 1 || ${1:-} == -h || ${1:-} == --help ]]; then
  sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//' >&2; exit 2
fi

T_START=$(date +%s%N)
TIMEOUT=${RXE_HARNESS_TIMEOUT:-600}
ACCEL=${RXE_HARNESS_ACCEL:-auto}
CPU=${RXE_HARNESS_CPU:-qemu64}
MEM=${RXE_HARNESS_MEM:-2G}
SMP=${RXE_HARNESS_SMP:-2}
NETDEV=${RXE_HARNESS_NETDEV:-lo}
OUT=${RXE_HARNESS_OUT:-$HERE/out}
VERBOSE=${RXE_HARNESS_VERBOSE:-0}

say() { echo "[harness] $*" >&2; }
die() { say "$*"; exit 125; }

command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing (apt-get install qemu-system-x86)"

ARG0=$1; shift
BIN=$ARG0
[[ -f $BIN ]] || BIN=$(command -v "$ARG0" 2>/dev/null) || die "no such file: $ARG0"
[[ -f $BIN ]] || die "no such file: $ARG0"
BIN=$(readlink -f "$BIN")

# ---- base initramfs: (re)build when missing or older than its inputs (scripts, kernel,
# rdma-core). ~1.7 s; concurrent harness runs serialise on a lock.
stale() {
  [[ -s $OUT/base.cpio && -s $OUT/vmlinuz ]] || return 0
  local f
  for f in "$HERE/guest-init.sh" "$HERE/build-initramfs.sh" /boot/vmlinuz-* \
           "$(readlink -f /usr/lib/x86_64-linux-gnu/libibverbs.so.1 2>/dev/null)"; do
    [[ -e $f && $f -nt $OUT/base.cpio ]] && return 0
  done
  return 1
}
if stale; then
  mkdir -p "$OUT"
  ( flock 9; if stale; then "$HERE/build-initramfs.sh" "$OUT"; fi ) 9>"$OUT/.lock" \
    || die "initramfs build failed"
fi

mkdir -p "$HERE/runs"
WORK=$(mktemp -d "$HERE/runs/run.XXXXXX")
QPID=
cleanup() {
  [[ -n $QPID ]] && kill "$QPID" 2>/dev/null
  if [[ ${RXE_HARNESS_KEEP:-0} == 1 ]]; then say "work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- per-run overlay: binary, its libs, run script, env
# Debian is merged-/usr and base.cpio has lib -> usr/lib etc. as symlinks. A "lib" *directory*
# entry in a later cpio would replace that symlink, so every path is rewritten to /usr/... .
OV=$WORK/overlay
mkdir -p "$OV/harness/bin"
usrpath() { sed -E 's#^/(lib|lib64|bin|sbin)/#/usr/\1/#' <<<"$1"; }
declare -A SEEN=()
copy_to() {  # host-src guest-dst
  local src=$1 dst; dst=$(usrpath "$2")
  [[ -n ${SEEN[$dst]:-} ]] && return 0
  SEEN[$dst]=1
  mkdir -p "$OV$(dirname "$dst")"
  cp -L "$src" "$OV$dst"
}
add_file() {  # host-src [guest-dst]: copies an ELF's shared-library closure too
  local src=$1 dst=${2:-/harness/bin/$(basename "$1")} lib
  copy_to "$src" "$dst"
  chmod +x "$OV$(usrpath "$dst")" 2>/dev/null
  if [[ $(head -c4 "$src" | od -An -tx1 | tr -d ' ') == 7f454c46 ]]; then
    [[ ${RXE_HARNESS_STRIP:-0} == 1 ]] && strip --strip-debug "$OV$(usrpath "$dst")" 2>/dev/null
    while read -r lib; do
      [[ -n $lib ]] && copy_to "$lib" "$lib"
    done < <(ldd "$src" 2>/dev/null | awk '/=> \//{print $3} /^[ \t]*\/[^ ]+ \(/{print $1}')
  fi
}
add_file "$BIN" "/harness/bin/$(basename "$BIN")"
for spec in ${RXE_HARNESS_FILES:-}; do
  src=${spec%%:*}; dst=
  [[ $spec == *:* ]] && dst=${spec#*:}
  [[ -f $src ]] || die "RXE_HARNESS_FILES: no such file $src"
  add_file "$(readlink -f "$src")" ${dst:+"$dst"}
done

q() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }
{
  echo "export PATH=/harness/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root"
  for v in RUST_BACKTRACE LIVEMIG_LOG RUST_LOG RUST_TEST_THREADS RUST_MIN_STACK ${RXE_HARNESS_ENV:-}; do
    [[ -n ${!v+x} ]] && echo "export $v=$(q "${!v}")"
  done
} > "$OV/harness/env"
{
  echo '#!/bin/sh'
  echo '. /harness/env'
  printf 'exec %s' "$(q "/harness/bin/$(basename "$BIN")")"
  for a in "$@"; do printf ' %s' "$(q "$a")"; done
  echo
} > "$OV/harness/run"
chmod 755 "$OV/harness/run"

VIRTFS=()
if [[ -n ${RXE_HARNESS_SHARE:-} ]]; then
  SH=$(readlink -f "$RXE_HARNESS_SHARE"); [[ -d $SH ]] || die "RXE_HARNESS_SHARE: not a dir"
  mkdir -p "$OV$SH"
  echo "share0 $SH" > "$OV/harness/mounts"
  VIRTFS=(-virtfs "local,path=$SH,mount_tag=share0,security_model=none,readonly=on,multidevs=remap")
fi

( cd "$OV" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 ) > "$WORK/overlay.cpio" \
  || die "cpio failed"
cat "$OUT/base.cpio" "$WORK/overlay.cpio" > "$WORK/initrd.cpio"

# PVH boot of the extracted ELF vmlinux when available (saves the xz unpack, ~3 s under TCG)
KERNEL=$OUT/vmlinuz
[[ -s $OUT/vmlinux && ${RXE_HARNESS_PVH:-1} == 1 ]] && KERNEL=$OUT/vmlinux
APPEND="console=ttyS0 quiet loglevel=3 panic=-1 rxe.netdev=$NETDEV cryptomgr.notests tsc=reliable"
# skip the per-CPU delay-loop calibration (~0.4 s under TCG): lpj = TSC Hz / kernel HZ
MHZ=$(awk -F: '/^cpu MHz/{print int($2); exit}' /proc/cpuinfo 2>/dev/null)
HZ_K=$(cat "$OUT/HZ" 2>/dev/null); HZ_K=${HZ_K:-250}
[[ -n $MHZ && $MHZ -gt 0 ]] && APPEND+=" lpj=$(( MHZ * 1000000 / HZ_K ))"
ADDR=${RXE_HARNESS_ADDR:-} MTU=${RXE_HARNESS_MTU:-}
if [[ $NETDEV == dummy ]]; then  # preset that makes rdma_cm work and keeps a 4096 path MTU
  ADDR=${ADDR:-169.254.77.1/16}; MTU=${MTU:-9000}
fi
[[ -n $ADDR ]] && APPEND+=" rxe.addr=$ADDR"
[[ -n $MTU ]] && APPEND+=" rxe.mtu=$MTU"
[[ -n ${RXE_HARNESS_HUGEPAGES:-} ]] && APPEND+=" rxe.hugepages=$RXE_HARNESS_HUGEPAGES"

run_qemu() {  # $1 = accel
  : > "$WORK/console.log"; : > "$WORK/stdout.log"; : > "$WORK/stderr.log"
  timeout -k 5 "$TIMEOUT" qemu-system-x86_64 \
    -accel "$1" -cpu "$CPU" -m "$MEM" -smp "$SMP" \
    -nodefaults -no-user-config -display none -no-reboot \
    -kernel "$KERNEL" -initrd "$WORK/initrd.cpio" -append "$APPEND" \
    -serial "file:$WORK/console.log" \
    -device virtio-serial-pci,id=vser \
    -chardev "file,id=hout,path=$WORK/stdout.log" -device virtserialport,bus=vser.0,chardev=hout,name=stdout \
    -chardev "file,id=herr,path=$WORK/stderr.log" -device virtserialport,bus=vser.0,chardev=herr,name=stderr \
    "${VIRTFS[@]}" </dev/null >"$WORK/qemu.log" 2>&1 &
  QPID=$!
  if [[ $VERBOSE == 1 ]]; then tail -s 0.2 -n +1 -F --pid=$QPID "$WORK/console.log" >&2 2>/dev/null & fi
  tail -s 0.2 -n +1 -F --pid=$QPID "$WORK/stdout.log" 2>/dev/null &
  local t1=$!
  tail -s 0.2 -n +1 -F --pid=$QPID "$WORK/stderr.log" >&2 2>/dev/null &
  local t2=$!
  wait $QPID; local rc=$?
  QPID=
  wait $t1 $t2 2>/dev/null
  return $rc
}

if [[ $ACCEL == auto ]]; then
  # KVM only when the CPU exposes VMX/SVM. A KVM_PVM host kernel (like the one this was
  # developed on) has a usable-looking /dev/kvm, but a stock Debian guest just hangs under it.
  ACCEL=tcg
  if [[ -r /dev/kvm && -w /dev/kvm ]] && grep -qwE 'vmx|svm' /proc/cpuinfo \
     && [[ ! -d /sys/module/kvm_pvm ]]; then
    ACCEL=kvm
  fi
fi

if [[ ${RXE_HARNESS_SHELL:-} == 1 ]]; then
  qemu-system-x86_64 -accel "$ACCEL" -cpu "$CPU" -m "$MEM" -smp "$SMP" \
    -nodefaults -no-user-config -display none -no-reboot \
    -kernel "$KERNEL" -initrd "$WORK/initrd.cpio" -append "$APPEND rxe.shell=1" \
    -serial mon:stdio "${VIRTFS[@]}"
  exit $?
fi

T_BOOT=$(date +%s%N)
run_qemu "$ACCEL"; QRC=$?
T_END=$(date +%s%N)

if [[ -n ${RXE_HARNESS_TIMING:-} ]]; then
  ms() { echo "$(( ($1) / 1000000 ))ms"; }
  say "prep $(ms T_BOOT-T_START), qemu $(ms T_END-T_BOOT), total $(ms T_END-T_START) (accel $ACCEL)"
fi

if [[ $QRC == 124 || $QRC == 137 ]]; then
  say "TIMEOUT after ${TIMEOUT}s; last console lines:"; tail -n 20 "$WORK/console.log" >&2
  exit 124
fi
RC=$(grep -a -o 'RXE-HARNESS-EXIT=[0-9]*' "$WORK/console.log" | tail -n1 | cut -d= -f2)
if [[ -z $RC ]]; then
  say "guest ended without an exit marker (qemu rc=$QRC); console log:"
  cat "$WORK/console.log" "$WORK/qemu.log" >&2
  exit 125
fi
if [[ $RC == 200 ]]; then
  say "rxe0 could not be created in the guest:"; cat "$WORK/console.log" >&2
fi
exit "$RC"
