#!/usr/bin/env bash
# run-verbs-tests.sh — build livemig's verbs test executables on the host and run them all,
# plus an ib_write_bw baseline, in ONE Soft-RoCE guest boot (harness.sh: qemu, rdma_rxe, rxe0).
#
#   usage (anywhere in the workspace):  tests/rxe/run-verbs-tests.sh [options] [-- test args]
#     --release        build the tests with the release profile
#     --no-bench       skip the ib_write_bw baseline
#     --no-integration only the livemig-transport unit tests (skip tests/tests/verbs_*.rs)
#     -- ARGS          extra arguments for every test executable (e.g. a name filter, --nocapture)
#   env: RUST_TEST_THREADS (default 2), BENCH_SIZE (default 65536), BENCH_ITERS (default 500),
#        and every harness.sh knob (RXE_HARNESS_TIMEOUT, RXE_HARNESS_VERBOSE, ...).
#
# What runs in the guest, in order:
#   1. the livemig-transport lib test executable, filtered to `verbs::` (device tests need
#      rxe0; the rest of the crate's unit tests run on the host anyway),
#   2. every tests/tests/verbs_*.rs executable of the livemig-tests crate,
#   3. the real CLI end to end over verbs: `livemig migrate --local --transport verbs` (a source
#      and a destination process, a running workload, checksum verified; fails the run if the
#      migration does not complete), pre-copy, then post-copy and hybrid (demand requests on
#      the urgent queue pair, pages placed by userfaultfd), and both through `livemig serve
#      --listen-verbs` (the daemon's verbs sessions),
#   4. ib_write_bw (perftest) server + client over rxe0 on 127.0.0.1, printed as
#      "IB_WRITE_BW size=... iters=... MB/s=..." for the benchmark baseline.
# RXE_REQUIRED=1 is set in the guest, so a test that finds no RDMA device fails there instead
# of skipping. Exit status: 0 if every test executable built and passed; 3 if all that ran
# passed but an integration test did not build (the others still run); the bench never fails
# the run.
set -uo pipefail
H=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$H/../.." && pwd)
cd "$ROOT"

PROFILE=() BENCH=1 INTEGRATION=1 TEST_ARGS=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --release) PROFILE=(--release) ;;
    --no-bench) BENCH=0 ;;
    --no-integration) INTEGRATION=0 ;;
    --) shift; TEST_ARGS=("$@"); break ;;
    -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

T0=$(date +%s%N)
# Prints the test executables of one `cargo test --no-run` invocation.
build() {
  cargo test --no-run --message-format=json "${PROFILE[@]}" "$@" \
    | python3 -c 'import sys, json
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        print(m["executable"])'
  return "${PIPESTATUS[0]}"
}

echo "[verbs-tests] building livemig-transport unit tests" >&2
mapfile -t LIB < <(build -p livemig-transport --lib) || true
[[ ${#LIB[@]} -eq 1 ]] || { echo "[verbs-tests] building the livemig-transport tests failed" >&2; exit 1; }

INT=() INT_FAILED=0
if [[ $INTEGRATION == 1 ]]; then
  for f in "$ROOT"/tests/tests/verbs_*.rs; do
    [[ -f $f ]] || continue
    t=$(basename "$f" .rs)
    echo "[verbs-tests] building livemig-tests --test $t" >&2
    if grep -q '^verbs *=' "$ROOT/tests/Cargo.toml"; then
      # livemig-tests has a verbs feature: the files are gated on it.
      # With fault injection: tests cut the link at chosen messages (CutAt).
      mapfile -t B < <(build -p livemig-tests --features verbs,fault-injection --test "$t")
    else
      # No such feature (yet): enable the transport's verbs feature and pass
      # `--cfg livemig_verbs` to this test crate only (cargo rustc), so the dependencies are
      # not rebuilt with different RUSTFLAGS.
      mapfile -t B < <(cargo rustc --message-format=json "${PROFILE[@]}" -p livemig-tests \
        --features livemig-transport/verbs --test "$t" -- --cfg livemig_verbs \
        | python3 -c 'import sys, json
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])')
    fi
    if [[ ${#B[@]} -eq 1 ]]; then
      INT+=("${B[0]}")
    else
      echo "[verbs-tests] WARNING: $t did not build (see the cargo output above); it will not run" >&2
      INT_FAILED=1
    fi
  done
fi
echo "[verbs-tests] building the livemig binary" >&2
CLI=$("$H/build-livemig.sh" "${PROFILE[@]}") || { echo "[verbs-tests] building the livemig binary failed" >&2; exit 1; }
T1=$(date +%s%N)

DRV=$(mktemp -d "${TMPDIR:-/tmp}/verbs-drv.XXXXXX")
trap 'rm -rf "$DRV"' EXIT
q() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }
{
  echo '#!/bin/sh'
  echo 'fail=0'
  echo 'up() { cut -d" " -f1 /proc/uptime; }'
  echo 'echo "=== guest up at $(up)s, $(cat /run/rxe-netdev 2>/dev/null) netdev, rxe0 $(cat /sys/class/infiniband/rxe0/ports/1/state 2>/dev/null)"'
  run() {  # name filter...
    local b=$1; shift
    local n; n=$(basename "$b")
    printf 'echo "=== %s (start $(up)s)"\n' "$n"
    printf '/harness/bin/%s' "$n"
    for a in "$@" "${TEST_ARGS[@]}"; do printf ' %s' "$(q "$a")"; done
    printf ' || { echo "=== %s FAILED ($?)"; fail=1; }\n' "$n"
    printf 'echo "=== %s done at $(up)s"\n' "$n"
  }
  run "${LIB[0]}" verbs::
  for b in "${INT[@]}"; do run "$b"; done
  cat <<'EOF'
echo "=== livemig migrate --local --transport verbs (start $(up)s)"
if /harness/bin/livemig migrate --local --transport verbs --size 16M --wss 2M --threads 1 \
     --policy ibrahim --warmup 0.5 --after 0.5 --no-progress > /tmp/cli.out 2> /tmp/cli.err \
   && grep -q 'migration completed: policy ibrahim over verbs' /tmp/cli.out; then
  cat /tmp/cli.out
  echo "=== livemig CLI over verbs: ok"
else
  echo "=== livemig CLI over verbs FAILED"; cat /tmp/cli.out /tmp/cli.err; fail=1
fi
for strat in postcopy hybrid; do
  echo "=== livemig migrate --local --transport verbs --strategy $strat (start $(up)s)"
  if /harness/bin/livemig migrate --local --transport verbs --strategy $strat --size 16M --wss 2M --threads 1 \
       --warmup 0.5 --no-progress > /tmp/cli.out 2> /tmp/cli.err \
     && grep -q "migration completed: .* over verbs" /tmp/cli.out && grep -q 'verified by the destination' /tmp/cli.out; then
    cat /tmp/cli.out; grep 'fault service' /tmp/cli.err
    echo "=== livemig CLI $strat over verbs: ok"
  else
    echo "=== livemig CLI $strat over verbs FAILED"; cat /tmp/cli.out /tmp/cli.err; fail=1
  fi
done
# The host daemon over verbs: sessions assembled on its out-of-band socket, memory exposed
# after the handshake (the daemon creates it on request), a pre-copy and a post-copy into it.
echo "=== livemig serve --listen-verbs (start $(up)s)"
/harness/bin/livemig secret new /tmp/secret > /dev/null
/harness/bin/livemig serve --listen 127.0.0.1:7879 --listen-verbs 127.0.0.1:7880 --secret-file /tmp/secret \
  > /tmp/serve.out 2> /tmp/serve.err &
sp=$!
for i in $(seq 1 100); do grep -q 'listening .* verbs' /tmp/serve.out && break; sleep 0.1; done
for strat in precopy postcopy; do
  if /harness/bin/livemig migrate --to 127.0.0.1:7880 --transport verbs --strategy $strat --size 16M --wss 2M \
       --threads 1 --warmup 0.5 --no-progress --secret-file /tmp/secret > /tmp/cli.out 2> /tmp/cli.err \
     && grep -q "migration completed: .* over verbs" /tmp/cli.out; then
    head -1 /tmp/cli.out
    echo "=== livemig migrate --to daemon over verbs ($strat): ok"
  else
    echo "=== livemig migrate --to daemon over verbs ($strat) FAILED"; cat /tmp/cli.out /tmp/cli.err /tmp/serve.out /tmp/serve.err; fail=1
  fi
done
kill $sp; wait $sp 2>/dev/null
grep 'session' /tmp/serve.err
# A disk over verbs: `disk serve` of a plain image, `disk receive --transport verbs`, `disk
# migrate --transport verbs` (hybrid: push, hand over, pull the rest); the image received
# must equal the source's, byte for byte. Once handed over when the push is done (auto), once
# at once (command), so that most chunks are pulled after the handover.
dd if=/dev/urandom of=/tmp/dsrc.img bs=1M count=8 2>/dev/null
for sw in auto command; do
  echo "=== livemig disk migrate --transport verbs --switchover $sw (start $(up)s)"
  rm -f /tmp/ddst.img /tmp/ddst.img.lmmeta /tmp/dsrc.ctl /tmp/dsrc.sock /tmp/ddst.sock
  /harness/bin/livemig disk serve /tmp/dsrc.img --socket /tmp/dsrc.sock --control /tmp/dsrc.ctl \
    > /tmp/dserve.out 2> /tmp/dserve.err &
  dsp=$!
  /harness/bin/livemig disk receive /tmp/ddst.img --listen 127.0.0.1:0 --transport verbs --secret-file /tmp/secret \
    --socket /tmp/ddst.sock --exit-when-done --json > /tmp/drecv.out 2> /tmp/drecv.err &
  drp=$!
  for i in $(seq 1 100); do grep -q '^listening .* disk' /tmp/drecv.out && [ -S /tmp/dsrc.ctl ] && break; sleep 0.1; done
  daddr=$(awk '/^listening /{print $2; exit}' /tmp/drecv.out)
  /harness/bin/livemig disk migrate --control /tmp/dsrc.ctl --to "$daddr" --secret-file /tmp/secret \
     --transport verbs --switchover $sw --json > /tmp/dmig.out 2> /tmp/dmig.err &
  dmp=$!
  if [ $sw = command ]; then
    for i in $(seq 1 100); do /harness/bin/livemig disk status --control /tmp/dsrc.ctl | grep -q migrating && break; sleep 0.1; done
    /harness/bin/livemig disk switchover --control /tmp/dsrc.ctl > /dev/null
  fi
  if wait $dmp && wait $drp && cmp /tmp/dsrc.img /tmp/ddst.img; then
    cat /tmp/dmig.out
    echo "=== livemig disk migrate over verbs ($sw): ok (8 MiB image equal at both ends)"
  else
    echo "=== livemig disk migrate over verbs ($sw) FAILED"; cat /tmp/dmig.out /tmp/dmig.err /tmp/drecv.out /tmp/drecv.err /tmp/dserve.err; fail=1
  fi
  kill $dsp $drp 2>/dev/null; wait $dsp 2>/dev/null
done
echo "=== livemig CLI done at $(up)s"
EOF
  if [[ $BENCH == 1 ]]; then
    cat <<EOF
# ib_write_bw baseline: first IPv4-mapped GID of rxe0 port 1
gi=
for g in /sys/class/infiniband/rxe0/ports/1/gids/*; do
  case \$(cat "\$g" 2>/dev/null) in 0000:0000:0000:0000:0000:ffff:*) gi=\${g##*/}; break ;; esac
done
sz=${BENCH_SIZE:-65536}; it=${BENCH_ITERS:-500}
echo "=== ib_write_bw (gid index \$gi, size \$sz, iters \$it, start \$(up)s)"
ib_write_bw -d rxe0 -x "\$gi" -s "\$sz" -n "\$it" -F > /tmp/bw-server.log 2>&1 &
sp=\$!
sleep 1
if ib_write_bw -d rxe0 -x "\$gi" -s "\$sz" -n "\$it" -F 127.0.0.1 > /tmp/bw-client.log 2>&1; then
  line=\$(awk '\$1 == "'"\$sz"'" {print; exit}' /tmp/bw-client.log)
  set -- \$line
  echo "IB_WRITE_BW size=\$1 iters=\$2 peak_MBps=\$3 avg_MBps=\$4 msg_rate_Mpps=\$5"
else
  echo "ib_write_bw client failed:"; cat /tmp/bw-client.log
fi
wait \$sp 2>/dev/null
echo "=== ib_write_bw done at \$(up)s"
EOF
  fi
  echo 'echo "=== guest finished at $(up)s (fail=$fail)"'
  echo 'exit $fail'
} > "$DRV/run-verbs-tests.sh"
chmod +x "$DRV/run-verbs-tests.sh"

FILES="${LIB[*]} ${INT[*]} $CLI"
echo "[verbs-tests] booting the guest with: $(for b in $FILES; do basename "$b"; done | tr '\n' ' ')" >&2
RXE_REQUIRED=1 RUST_TEST_THREADS=${RUST_TEST_THREADS:-2} RUST_BACKTRACE=${RUST_BACKTRACE:-1} \
RXE_HARNESS_FILES="$FILES ${RXE_HARNESS_FILES:-}" \
RXE_HARNESS_ENV="RXE_REQUIRED ${RXE_HARNESS_ENV:-}" \
RXE_HARNESS_TIMING=1 \
  "$H/harness.sh" "$DRV/run-verbs-tests.sh"
RC=$?
T2=$(date +%s%N)
echo "[verbs-tests] build $(( (T1 - T0) / 1000000 )) ms, boot+tests $(( (T2 - T1) / 1000000 )) ms, exit $RC" >&2
if [[ $RC == 0 && $INT_FAILED == 1 ]]; then
  echo "[verbs-tests] FAILED: some tests/tests/verbs_*.rs executables did not build" >&2
  exit 3
fi
exit $RC
