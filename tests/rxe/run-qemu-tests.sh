#!/usr/bin/env bash
# run-qemu-tests.sh — real QEMU migrations over RDMA verbs: the test guest, under QEMU with
# livemig's patch (nested TCG inside the Soft-RoCE guest), migrated hop by hop through
# livemig's verbs carrier (single channel, and multifd), livemig's engine moving the RAM
# over verbs (post-copy), and QEMU's own tcp: and rdma: URIs. See qemu-in-guest.sh.
#
#   usage: tests/rxe/run-qemu-tests.sh [--release]
#     --release   build livemig with the release profile (figures closer to a deployment)
#
# The guest runs with a dummy netdev (rdma_cm, which QEMU's rdma: needs, refuses loopback).
# Prints the in-guest log, then the `QEMU_HOP` lines (each hop's total time, downtime and
# throughput; nested TCG, so compare the hops with each other, not with the host's figures).
# Exit status 0 when every hop completed and the guest went on after each.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PROFILE=()
for a in "$@"; do
  case $a in
    --release) PROFILE=(--release) ;;
    *) echo "unknown option $a" >&2; exit 2 ;;
  esac
done
cd "$ROOT"
T0=$(date +%s)
echo "[qemu-tests] building the livemig binary" >&2
CLI=$("$HERE/build-livemig.sh" "${PROFILE[@]}") || { echo "[qemu-tests] building the livemig binary failed" >&2; exit 1; }
QEMU=${LIVEMIG_QEMU_PATCHED:-}
[[ -x $QEMU ]] || QEMU=$(qemu-patch/qemu/build.sh)
GUEST=$(qemu-patch/guest/build.sh)
FW=""
for f in /usr/share/seabios/bios-256k.bin /usr/share/qemu/linuxboot_dma.bin /usr/share/qemu/kvmvapic.bin \
         "$GUEST/vmlinuz" "$GUEST/initramfs.cpio.gz"; do
  [[ -r $f ]] || { echo "[qemu-tests] missing $f (scripts/install-deps.sh)" >&2; exit 1; }
  FW+=" $f:/harness/fw/$(basename "$f")"
done
LOG=$(mktemp "${TMPDIR:-/tmp}/qemu-tests.XXXXXX")
trap 'rm -f "$LOG"' EXIT
echo "[qemu-tests] booting the Soft-RoCE guest (QEMU: $QEMU)" >&2
set +e
RXE_HARNESS_ENV="CARRIER LAST_HOP QEMU_GUEST_MEM SETTLE" RXE_HARNESS_NETDEV=dummy RXE_HARNESS_TIMEOUT=${RXE_HARNESS_TIMEOUT:-1500} RXE_HARNESS_MEM=${RXE_HARNESS_MEM:-3G} \
  RXE_HARNESS_FILES="$CLI $QEMU$FW" "$HERE/harness.sh" "$HERE/qemu-in-guest.sh" 2>&1 | tee "$LOG"
RC=${PIPESTATUS[0]}
set -e
echo "[qemu-tests] figures (nested TCG; $(basename "$(dirname "$(dirname "$CLI")")") build of livemig):"
grep '^QEMU_HOP' "$LOG" || true
echo "[qemu-tests] $(( $(date +%s) - T0 )) s, exit $RC" >&2
exit "$RC"
