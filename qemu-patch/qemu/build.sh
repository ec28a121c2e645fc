#!/usr/bin/env bash
# Builds Debian's QEMU 7.2 with livemig's patch series (the *.patch files here, in order):
# the x86_64 system emulator only, TCG, QEMU's own `rdma:` migration (for comparisons with
# livemig's verbs), no documentation. Prints the binary's path.
#
#   qemu-patch/qemu/build.sh [WORKDIR]     (default: target/qemu-livemig)
#
# Needs a deb-src entry for bookworm and the build dependencies (scripts/install-deps.sh adds
# both). A build whose patches and script are unchanged is reused. The binary runs with
# `-L /usr/share/qemu -L /usr/share/seabios` (the dfsg source has no firmware blobs).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${1:-$here/../../target/qemu-livemig}
mkdir -p "$work"
work=$(cd "$work" && pwd)
stamp=$(cat "$here"/*.patch "$here/build.sh" | sha256sum | cut -d' ' -f1)
bin=$work/src/build/qemu-system-x86_64
if [[ -x $bin && -f $work/stamp && $(cat "$work/stamp") == "$stamp" ]]; then
  echo "$bin"
  exit 0
fi
log=$work/build.log
: > "$log"
t0=$(date +%s)
rm -rf "$work/src" "$work/dl"
mkdir -p "$work/dl"
# The series is written against 7.2 (bookworm): take that source, whatever else apt knows.
(cd "$work/dl" && apt-get source qemu/bookworm >>"$log" 2>&1) || {
  echo "apt-get source qemu/bookworm failed (is there a deb-src entry for bookworm? scripts/install-deps.sh adds one); see $log" >&2
  exit 1
}
src=$(ls -d "$work"/dl/qemu-7.2*/ 2>/dev/null | head -1)
[[ -n $src ]] || { echo "the downloaded source is not QEMU 7.2: $(ls "$work/dl")" >&2; exit 1; }
mv "$src" "$work/src"
cd "$work/src"
for p in "$here"/*.patch; do
  patch -p1 --forward --quiet < "$p" >>"$log" 2>&1 || { echo "applying $(basename "$p") failed; see $log" >&2; exit 1; }
done
mkdir -p build
cd build
../configure --target-list=x86_64-softmmu --disable-docs --disable-werror --without-default-features \
  --enable-tcg --disable-user --enable-fdt=system --enable-rdma >>"$log" 2>&1 || { echo "configure failed; see $log" >&2; exit 1; }
ninja -j"$(nproc)" qemu-system-x86_64 >>"$log" 2>&1 || { echo "the build failed; see $log" >&2; exit 1; }
echo "$stamp" > "$work/stamp"
echo "patched QEMU built in $(( $(date +%s) - t0 )) s" >&2
echo "$bin"
