#!/usr/bin/env bash
# run.sh — libvirt live migrations through livemig, with the glue in qemu-patch/libvirt/: two
# libvirt instances on this machine stand for two hosts (each libvirtd in its own mount
# namespace over private run/lib/etc/log/cache directories, with its own host UUID; the
# destination also has its own /run/livemig), the test guest runs under the first, and
# `livemig-virsh-migrate` moves it to the second: the destination's libvirt hook starts the
# destination carrier, `virsh migrate --live --migrateuri unix://…` sends QEMU's stream
# through the two carriers. Checked: the guest runs at the destination only and its counter
# goes on; then a migration whose destination carrier never comes (no hook on the first
# instance) fails and the guest runs on where it was.
#
#   tests/libvirt/run.sh        (root; libvirt-daemon, libvirt-daemon-driver-qemu,
#                                libvirt-clients and qemu-system-x86: scripts/install-deps.sh)
# Without libvirt it skips with a message, unless LIVEMIG_REQUIRE_LIBVIRT=1.
set -euo pipefail
# libvirtd, useradd and groupadd live in sbin, which a non-login PATH may lack.
export PATH=$PATH:/usr/sbin:/sbin
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
if ! command -v libvirtd > /dev/null || ! command -v virsh > /dev/null; then
  [[ ${LIVEMIG_REQUIRE_LIBVIRT:-0} == 1 ]] && { echo "[libvirt] libvirtd/virsh missing (scripts/install-deps.sh)" >&2; exit 1; }
  echo "[libvirt] SKIPPED: libvirtd/virsh not installed" >&2
  exit 0
fi
[[ $(id -u) -eq 0 ]] || { echo "[libvirt] needs root (mount namespaces, libvirtd)" >&2; exit 1; }
T0=$(date +%s)
CLI=$("$ROOT/tests/rxe/build-livemig.sh")
GUEST=$("$ROOT/qemu-patch/guest/build.sh")
# What libvirt-daemon-system would create: libvirtd resolves its built-in QEMU user at start.
getent group kvm > /dev/null || groupadd -r kvm
getent group libvirt-qemu > /dev/null || groupadd -r libvirt-qemu
getent passwd libvirt-qemu > /dev/null || useradd -r -g kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
W=$(mktemp -d /tmp/livemig-libvirt.XXXXXX)
NAME=lmvm$$
PIDS=()
cleanup() {
  set +e
  for u in "${URI_A:-}" "${URI_B:-}"; do [[ -n $u ]] && virsh -c "$u" destroy "$NAME" > /dev/null 2>&1; done
  pkill -f "livemig-libvirt.*carrier" 2>/dev/null || true
  pkill -f "libvirtd -d -p $W/" 2>/dev/null || true
  local i=0
  while pgrep -f "libvirtd -d -p $W/" > /dev/null && [[ $i -lt 50 ]]; do sleep 0.1; i=$((i + 1)); done
  pkill -9 -f "libvirtd -d -p $W/" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
mkdir -p /run/livemig /var/run/libvirt /var/lib/libvirt /etc/libvirt /var/log/libvirt /var/cache/libvirt
"$CLI" secret new "$W/secret" > /dev/null
# instance NAME UUID [MIG]: a libvirtd over private directories under $W/NAME (MIG: a private
# /run/livemig too). Prints its URI.
instance() {
  local d=$W/$1
  mkdir -p "$d"/{run,lib,etc/hooks,log,cache,mig}
  cat > "$d/etc/qemu.conf" << 'CONF'
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
CONF
  printf 'host_uuid = "%s"\nlog_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n' "$2" > "$d/etc/libvirtd.conf"
  local mig=""
  [[ ${3:-} == mig ]] && mig="mount --bind $d/mig /run/livemig &&"
  unshare -m --propagation private sh -c "mount --bind $d/run /var/run/libvirt && mount --bind $d/lib /var/lib/libvirt && \
    mount --bind $d/etc /etc/libvirt && mount --bind $d/log /var/log/libvirt && mount --bind $d/cache /var/cache/libvirt && \
    $mig exec libvirtd -d -p $W/$1.pid"
  local i=0
  until [[ -S $d/run/libvirt-sock ]]; do
    i=$((i + 1)); [[ $i -gt 100 ]] && { echo "[libvirt] libvirtd $1 did not start: $(tail -n 5 "$d/log/libvirtd.log")" >&2; return 1; }
    sleep 0.1
  done
  echo "qemu+unix:///system?socket=$d/run/libvirt-sock"
}
# The destination host has livemig's hook.
mkdir -p "$W/B/etc/hooks"
cp "$ROOT/qemu-patch/libvirt/qemu-hook" "$W/B/etc/hooks/qemu"
PORT=$((20000 + $$ % 20000))
printf 'LIVEMIG=%s\nSECRET=%s\nRUN=/run/livemig\nLISTEN=127.0.0.1:%s\nMAX_TIME=120\n' "$CLI" "$W/secret" "$PORT" > "$W/B/etc/hooks/livemig.conf"
URI_A=$(instance A 4c6d0a3e-0000-4000-8000-0000000000a1)
URI_B=$(instance B 4c6d0a3e-0000-4000-8000-0000000000b2 mig)
echo "[libvirt] two libvirt instances: $URI_A, $URI_B" >&2
SERIAL=$W/$NAME.serial
cat > "$W/$NAME.xml" << XML
<domain type='qemu'>
  <name>$NAME</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>$GUEST/vmlinuz</kernel>
    <initrd>$GUEST/initramfs.cpio.gz</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 dirty=64,24,20000</cmdline>
  </os>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>$(command -v qemu-system-x86_64)</emulator>
    <serial type='file'><source path='$SERIAL' append='on'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
XML
counter() { { grep -ao '^DIRTY t=[0-9]*' "$SERIAL" 2>/dev/null || true; } | tail -1 | cut -d= -f2; }
wait_counter() { # N SECS
  local i=0 c
  while :; do
    c=$(counter); [[ -n $c && $c -ge $1 ]] && return 0
    i=$((i + 1)); [[ $i -gt $(($2 * 10)) ]] && { echo "[libvirt] the guest's counter stayed at '$c' (wanted $1)" >&2; tail -5 "$SERIAL" >&2; return 1; }
    sleep 0.1
  done
}
running_at() { [[ $(virsh -c "$1" domstate "$NAME" 2>/dev/null) == running ]]; }
virsh -c "$URI_A" create "$W/$NAME.xml" > /dev/null
wait_counter 2 120
echo "[libvirt] guest $NAME runs under A (counter $(counter))" >&2

# A -> B with the source carrier dialling a port where no carrier listens (the hook's
# carrier is elsewhere): the migration fails and the guest runs on at A.
c=$(counter)
if LIBVIRT_DEFAULT_URI=$URI_A LIVEMIG_CONF_DIR=$W/B/etc/hooks CONNECT_WITHIN=2 \
   "$ROOT/qemu-patch/libvirt/livemig-virsh-migrate" "$NAME" "$URI_B" "127.0.0.1:$((PORT + 1))" 2> "$W/fail.err"; then
  echo "[libvirt] FAILED: a migration without its destination carrier succeeded" >&2; exit 1
fi
grep -q "the guest is: running" "$W/fail.err" || { echo "[libvirt] FAILED: $(cat "$W/fail.err")" >&2; exit 1; }
running_at "$URI_A" || { echo "[libvirt] FAILED: the guest stopped at A" >&2; exit 1; }
! running_at "$URI_B" || { echo "[libvirt] FAILED: the guest runs at B too" >&2; exit 1; }
wait_counter $((c + 3)) 60
echo "[libvirt] A -> B with no carrier at the address dialled failed as it must ($(grep -o 'connecting to the destination carrier[^(]*' "$W/fail.err" | head -1)); the guest runs on at A (counter $(counter))" >&2
# The carrier the hook started for that attempt waits for a source that will not come.
pkill -f "qemu carrier --listen 127.0.0.1:$PORT " || true
sleep 0.5

# A -> B through livemig.
c=$(counter)
t=$(date +%s%N)
LIBVIRT_DEFAULT_URI=$URI_A LIVEMIG_CONF_DIR=$W/B/etc/hooks "$ROOT/qemu-patch/libvirt/livemig-virsh-migrate" \
  "$NAME" "$URI_B" "127.0.0.1:$PORT" --verbose
ms=$(( ($(date +%s%N) - t) / 1000000 ))
running_at "$URI_B" || { echo "[libvirt] FAILED: the guest does not run at B" >&2; exit 1; }
! running_at "$URI_A" || { echo "[libvirt] FAILED: the guest still runs at A" >&2; exit 1; }
wait_counter $((c + 3)) 60
grep -q '"channels":1' "$W/B/mig/$NAME.carrier.log" || { echo "[libvirt] FAILED: the destination carrier: $(cat "$W/B/mig/$NAME.carrier.log")" >&2; exit 1; }
echo "[libvirt] A -> B through livemig in $ms ms (virsh and both carriers); the guest runs at B only, counter $c -> $(counter)" >&2
echo "LIBVIRT_MIGRATION ms=$ms destination_carrier=$(grep -o '"bytes_in":[0-9]*' "$W/B/mig/$NAME.carrier.log")"

echo "[libvirt] all passed in $(( $(date +%s) - T0 )) s" >&2
