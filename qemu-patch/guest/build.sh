#!/usr/bin/env bash
# Builds the test guest for the QEMU tests and benchmarks from Debian packages: the host's
# Debian kernel (linux-image-amd64) and an initramfs with busybox-static, the static memory
# dirtier `dirty` (dirty.c), the virtio-blk modules, and `init` (kernel command line:
# dirty=N,W,RATE runs the dirtier; diskwr=MB,SPAN,MS loops O_DIRECT writes to /dev/vda;
# diskchk=SPAN,BLOCK_KIB,RATE runs the disk checker `diskchk` (diskchk.c) on /dev/vda;
# boot=WRITE_MIB mounts /dev/vda as ext4, reads every file named in its /boot.list, writes a
# WRITE_MIB file and syncs: a boot-like access pattern, ended by a `BOOTED` line).
# The dirtier prints a `DIRTY t=…` line every second on the serial console, the checker
# `DISKCHK …` lines.
#
# Usage: qemu-patch/guest/build.sh [OUT_DIR]   (default: target/qemu-guest)
# Produces OUT/vmlinuz and OUT/initramfs.cpio.gz; reuses them when they are newer than the
# sources.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${1:-$HERE/../../target/qemu-guest}
mkdir -p "$OUT"
if [[ -s $OUT/initramfs.cpio.gz && -s $OUT/vmlinuz && $OUT/initramfs.cpio.gz -nt $HERE/init &&
      $OUT/initramfs.cpio.gz -nt $HERE/dirty.c && $OUT/initramfs.cpio.gz -nt $HERE/diskchk.c &&
      $OUT/initramfs.cpio.gz -nt $HERE/build.sh ]]; then
  echo "$OUT"; exit 0
fi
KVER=${KVER:-$(ls -1 /lib/modules | sort -V | tail -1)}
[[ -r /boot/vmlinuz-$KVER ]] || { echo "/boot/vmlinuz-$KVER is missing or unreadable (apt-get install linux-image-amd64; run as root)" >&2; exit 1; }
for t in busybox gcc cpio modprobe gzip; do
  command -v "$t" >/dev/null || { echo "missing tool: $t (scripts/install-deps.sh)" >&2; exit 1; }
done
ROOT=$(mktemp -d "${TMPDIR:-/tmp}/livemig-guest.XXXXXX")
trap 'rm -rf "$ROOT"' EXIT
mkdir -p "$ROOT"/{bin,sbin,proc,sys,dev,tmp,lib/modules}
cp "$(command -v busybox)" "$ROOT/bin/busybox"
for a in $("$ROOT/bin/busybox" --list); do
  [[ $a == busybox ]] || ln -sf busybox "$ROOT/bin/$a"
done
gcc -static -O2 -o "$ROOT/bin/dirty" "$HERE/dirty.c"
gcc -static -O2 -Wall -Werror -o "$ROOT/bin/diskchk" "$HERE/diskchk.c"
# virtio-blk, ext4 and what they need, flat under /lib/modules (the init loads them by name).
for m in virtio_pci virtio_blk ext4 crc32c_generic; do
  while read -r cmd path _; do
    [[ $cmd == insmod ]] || continue
    cp "$path" "$ROOT/lib/modules/$(basename "$path")"
  done < <(modprobe -S "$KVER" --show-depends "$m" 2>/dev/null || true)
done
cp "$HERE/init" "$ROOT/init"
chmod 755 "$ROOT/init"
( cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -1 ) > "$OUT/initramfs.cpio.gz.tmp"
mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
cp "/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
echo "$OUT"
