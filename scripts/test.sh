#!/usr/bin/env bash
# The project's test command (README, CI):
#  0. QEMU with livemig's patch is built (qemu-patch/qemu/build.sh) for the external-RAM test;
#  1. unit + integration tests on the host (TCP backend, conformance, adversarial peers,
#     two-process transfers, dirty tracking, workloads, policies, pre-copy migrations);
#     verbs tests skip on the host with a visible message (no RDMA device here);
#     then `virsh migrate --live` between two libvirt instances through livemig's carriers;
#  2. every fuzz target for FUZZ_SECONDS (default 20) each;
#  3. the verbs tests inside a Soft-RoCE guest (tests/rxe), where a missing device fails, and
#     real QEMU migrations over verbs there (livemig's carrier, QEMU's rdma:, external RAM).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== host tests" >&2
# The disk tests need real NBD clients here (install-deps.sh installs them); elsewhere they
# skip with a message.
export LIVEMIG_REQUIRE_NBD_TOOLS=1
# The QEMU test boots a real guest under TCG (qemu-system-x86 and the Debian kernel, which
# install-deps.sh installs); elsewhere it skips with a message.
export LIVEMIG_REQUIRE_QEMU=1
# The image-repository tests run against a real S3 server on loopback (s3s-fs, which
# install-deps.sh installs); elsewhere they skip with a message.
export LIVEMIG_REQUIRE_S3=1
# QEMU with livemig's patch (external RAM): Debian's QEMU 7.2 source, patched and built once
# into target/qemu-livemig (about 3 minutes on 2 cores; reused while the patches are unchanged).
echo "== QEMU with livemig's patch" >&2
LIVEMIG_QEMU_PATCHED=$(qemu-patch/qemu/build.sh)
export LIVEMIG_QEMU_PATCHED
cargo test --workspace --features livemig/fault-injection,livemig-tests/fault-injection
echo "== libvirt migrations through livemig (qemu-patch/libvirt/)" >&2
LIVEMIG_REQUIRE_LIBVIRT=1 tests/libvirt/run.sh
echo "== fuzzing (${FUZZ_SECONDS:-20}s per target)" >&2
fuzz/run.sh "${FUZZ_SECONDS:-20}"
if [[ ${SKIP_RXE:-0} == 1 ]]; then
  echo "== Soft-RoCE guest tests SKIPPED (SKIP_RXE=1)" >&2
else
  echo "== verbs tests in a Soft-RoCE guest" >&2
  tests/rxe/run-verbs-tests.sh
  echo "== real QEMU migrations over verbs in a Soft-RoCE guest" >&2
  tests/rxe/run-qemu-tests.sh
fi
echo "== all tests passed" >&2
