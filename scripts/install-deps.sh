#!/usr/bin/env bash
# Installs what livemig needs on Debian 12 (run as root, or with sudo available).
#  - build: libibverbs-dev librdmacm-dev libclang-dev pkg-config (rdma-sys bindgen), clang
#  - RDMA tests: qemu-system-x86 + linux-image-amd64 (a kernel with rdma_rxe) + busybox-static,
#    cpio, kmod, rdma-core, ibverbs-providers, ibverbs-utils, perftest, iproute2
#  - benchmarks/tests: iperf3, iproute2 (netns, veth, tc), procps (kill, for the CLI in-doubt tests)
#  - NBD clients for the disk tests and benchmarks: qemu-utils (qemu-img, qemu-io, qemu-nbd),
#    libnbd-bin (nbdinfo, nbdcopy)
#  - QEMU with livemig's patch (qemu-patch/qemu/build.sh): a deb-src entry for bookworm (added
#    to /etc/apt/sources.list.d/ when none exists) and the build dependencies of a minimal build
#    with QEMU's own rdma: migration (librdmacm-dev, libibumad-dev)
#  - libvirt for the libvirt glue's test (tests/libvirt/run.sh): libvirt-daemon,
#    libvirt-daemon-driver-qemu, libvirt-clients (no daemon is started or enabled here)
#  - an S3 server for the image-repository tests and benchmarks: s3s-fs (crates.io, built with
#    cargo install; the version is pinned to one that builds with this Rust)
set -euo pipefail
SUDO=; [[ $(id -u) -eq 0 ]] || SUDO=sudo
PKGS=(build-essential pkg-config clang libclang-dev libibverbs-dev librdmacm-dev rdma-core ibverbs-providers
      ibverbs-utils perftest iproute2 iperf3 jq qemu-system-x86 linux-image-amd64 busybox-static cpio kmod python3 procps
      libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
      qemu-utils libnbd-bin dpkg-dev ninja-build meson libglib2.0-dev libpixman-1-dev flex bison python3-venv
      zlib1g-dev libfdt-dev patch libibumad-dev)
# Sources for the patched QEMU build (apt-get source qemu).
if ! apt-cache showsrc qemu 2>/dev/null | grep -q '^Version: 1:7\.2'; then
  echo "adding a deb-src entry for bookworm (the patched QEMU's source)" >&2
  $SUDO tee /etc/apt/sources.list.d/livemig-bookworm-src.sources >/dev/null <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  $SUDO apt-get update -qq
fi
# Twice: an install can remove a package installed before (a newer qemu-utils from
# backports conflicts with bookworm's qemu-system-x86 and goes), and the second pass puts
# bookworm's back.
for pass in 1 2; do
  missing=()
  for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [[ ${#missing[@]} -gt 0 ]]; then
    echo "installing (pass $pass): ${missing[*]}" >&2
    [[ $pass == 2 ]] || $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
done
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || { echo "$p could not be installed" >&2; exit 1; }; done
command -v cargo >/dev/null || { echo "Rust (cargo) is required: https://rustup.rs" >&2; exit 1; }
rustup component add rustfmt clippy >/dev/null 2>&1 || true
if ! command -v s3s-fs >/dev/null && [[ ! -x ${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs ]]; then
  echo "installing s3s-fs (cargo install, ~3 minutes)" >&2
  cargo install s3s-fs@0.14.1 --features binary --locked --quiet >&2
fi
