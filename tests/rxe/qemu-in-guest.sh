#!/bin/sh
# qemu-in-guest.sh — runs inside the Soft-RoCE guest (busybox sh), started by
# run-qemu-tests.sh: one test guest (QEMU with livemig's patch, nested TCG, RAM in a shared
# memfd) migrated along a chain of QEMUs on this guest's rxe device, each hop a different way:
#   1. livemig's carrier over verbs, a single channel handed to QEMU (fd:)
#   2. livemig's engine moving the RAM over verbs (external RAM), post-copy; and 2b, pre-copy
#      with QEMU's own dirty log (the 6.1 kernel lacks uffd-wp-async)
#   3. QEMU's own tcp: URI (the baseline); the guest must then run on for SETTLE (15) ticks
#   4. livemig's carrier over verbs, multifd (2 channels + main, all handed to QEMU)
#   5. QEMU's own rdma: URI (rdma_cm on the same rxe device): outcome reported
# After each carrier hop and hop 2b the destination (started with -S) must hold the same guest
# memory as the source, byte for byte (QMP pmemsave at both ends), before it runs.
# Hops 1, 2, 2b, 3 and 4 must complete and the destination's guest counter must go on after
# each. Each hop prints a `QEMU_HOP` line with its figures. CARRIER=tcp LAST_HOP=1|3|4 LIVEMIG=…
# QEMU=… FW=… ADDR=127.0.0.1 run the carrier hops on a host without RDMA; LAST_HOP=0 only boots.
# Files: /harness/bin/livemig, /harness/bin/qemu-system-x86_64, /harness/fw/* (firmware, the
# test guest's vmlinuz and initramfs.cpio.gz).
set -u
up() { cut -d" " -f1 /proc/uptime; }
say() { echo "=== $* (at $(up)s)"; }
L=${LIVEMIG:-/harness/bin/livemig}
Q=${QEMU:-/harness/bin/qemu-system-x86_64}
FW=${FW:-/harness/fw}
MEM=${QEMU_GUEST_MEM:-128}
CARRIER=${CARRIER:-verbs}
LAST_HOP=${LAST_HOP:-5}
fail=0
cd /tmp || exit 1
if [ -z "${ADDR:-}" ]; then
  ADDR=$(ip -o -4 addr show dev "$(cat /run/rxe-netdev)" | awk '{print $4}' | cut -d/ -f1 | head -1)
  case $ADDR in 127.*|"") echo "rdma_cm needs a non-loopback address (RXE_HARNESS_NETDEV=dummy); have '$ADDR'"; exit 1 ;; esac
fi
rm -f /tmp/secret; $L secret new /tmp/secret > /dev/null || exit 1

# guest NAME [incoming [paused]]: starts a QEMU, waits for its QMP socket. A paused one (-S)
# stays stopped after its incoming migration until `cont`.
guest() {
  n=$1
  set -- -L "$FW" -M q35,memory-backend=mem0 -object "memory-backend-memfd,id=mem0,size=${MEM}M,share=on" \
    -accel tcg -m "$MEM" -smp 1 -display none -nodefaults -monitor none -no-reboot \
    -serial "file:/tmp/$n.serial" -kernel "$FW/vmlinuz" -initrd "$FW/initramfs.cpio.gz" \
    -append "console=ttyS0 quiet panic=-1 dirty=24,8,2000" -qmp "unix:/tmp/$n.qmp,server=on,wait=off" \
    $( [ "${2:-}" = incoming ] && echo "-incoming defer" ) $( [ "${3:-}" = paused ] && echo "-S" )
  rm -f "/tmp/$n.qmp"
  $Q "$@" 2> "/tmp/$n.err" &
  echo $! > "/tmp/$n.pid"
  i=0
  while [ ! -S "/tmp/$n.qmp" ]; do
    i=$((i + 1)); [ $i -gt 300 ] && { echo "QEMU $n never opened QMP:"; cat "/tmp/$n.err"; return 1; }
    sleep 0.1
  done
}
stop() { kill "$(cat "/tmp/$1.pid")" 2>/dev/null; }
counter() { grep -o '^DIRTY t=[0-9]*' "/tmp/$1.serial" 2>/dev/null | tail -1 | cut -d= -f2; }
# wait_counter NAME N SECS
wait_counter() {
  i=0
  while :; do
    c=$(counter "$1"); [ -n "$c" ] && [ "$c" -ge "$2" ] && return 0
    i=$((i + 1)); [ $i -gt $(($3 * 10)) ] && {
      echo "guest $1's counter stayed at '${c}' (wanted $2)"
      sleep 3; grep -m1 -B2 -A40 'BUG\|Oops\|general protection\|RIP:' "/tmp/$1.serial" || tail -20 "/tmp/$1.serial"
      return 1
    }
    sleep 0.1
  done
}
# goes_on NAME: the guest at NAME runs and its counter advances by 2.
goes_on() {
  $L qemu qmp --qmp "/tmp/$1.qmp" query-status | grep -q '"running":true' || { echo "guest $1 is not running"; return 1; }
  c=$(counter "$1"); wait_counter "$1" $(( ${c:-0} + 2 )) "${2:-120}"
}
# field JSON KEY: a number or string at the top level or one level down (busybox has no jq).
field() { echo "$1" | tr ',{}' '\n\n\n' | grep "\"$2\":" | head -1 | cut -d: -f2 | tr -d '"'; }
# carrier NAME [args]: the destination carrier into QEMU NAME; prints its address.
carrier() {
  n=$1; shift
  : > "/tmp/$n.carrier"
  $L qemu carrier --listen "$ADDR:0" --incoming "/tmp/$n.in" --dst-qmp "/tmp/$n.qmp" --secret-file /tmp/secret \
    --transport "$CARRIER" --json "$@" > "/tmp/$n.carrier" 2> "/tmp/$n.carrier.err" &
  echo $! > "/tmp/$n.carrier.pid"
  i=0
  until grep -q '^listening ' "/tmp/$n.carrier"; do
    i=$((i + 1)); [ $i -gt 300 ] && { cat "/tmp/$n.carrier.err" >&2; return 1; }
    sleep 0.1
  done
  awk '/^listening /{print $2; exit}' "/tmp/$n.carrier"
}
# settle: with SETTLE=N, the guest's counter must advance N more; then the run ends.
settle() {
  [ -n "${SETTLE:-}" ] && { c=$(counter "$prev"); wait_counter "$prev" $((c + SETTLE)) $((SETTLE * 3)) || fail=1; say "guest $prev at $(counter "$prev")"; }
  stop "$prev"; say "done (fail=$fail)"; exit $fail
}
hop_ok() { say "hop $1 ok"; }
hop_failed() { say "hop $1 FAILED"; fail=1; }

say "booting the test guest a (${MEM} MiB, nested TCG) on rxe over $(cat /run/rxe-netdev) $ADDR"
guest a || exit 1
wait_counter a 2 400 || { cat /tmp/a.err; exit 1; }
say "guest a runs (counter $(counter a))"

# same_memory A B: the guest memory of the paused QEMUs A and B is equal byte for byte (QMP
# pmemsave of all of it at both ends, then cmp).
same_memory() {
  for g in "$1" "$2"; do
    rm -f "/tmp/$g.mem"
    $L qemu qmp --qmp "/tmp/$g.qmp" pmemsave "{\"val\":0,\"size\":$((MEM << 20)),\"filename\":\"/tmp/$g.mem\"}" > /dev/null \
      || { echo "pmemsave on $g failed"; return 1; }
  done
  cmp "/tmp/$1.mem" "/tmp/$2.mem" > "/tmp/$2.cmp" 2>&1; r=$?
  [ $r -ne 0 ] && { echo "guest memory of $2 differs from $1's:"; head -3 "/tmp/$2.cmp"; cmp -l "/tmp/$1.mem" "/tmp/$2.mem" | wc -l; }
  rm -f "/tmp/$1.mem" "/tmp/$2.mem"
  return $r
}

# carrier_hop HOP NAME [--multifd N]: livemig's carrier over $CARRIER, from $prev into NAME,
# started paused: once QEMU completed, both guests' memory must be equal before NAME runs.
carrier_hop() {
  hop=$1; n=$2; shift 2
  say "hop $hop: $prev -> $n, livemig carrier over $CARRIER ${*:-(single channel, handed to QEMU)}"
  guest "$n" incoming paused || exit 1
  addr=$(carrier "$n") || return 1
  out=$($L qemu migrate --src-qmp "/tmp/$prev.qmp" --to "$addr" --secret-file /tmp/secret --transport "$CARRIER" \
        --socket-dir /tmp --max-time 240 --max-bandwidth 100G --json "$@" 2> "/tmp/$n.migrate.err")
  rc=$?
  echo "$out"
  wait "$(cat "/tmp/$n.carrier.pid")" 2>/dev/null
  if [ $rc -ne 0 ] || [ "$(field "$out" status)" != completed ] || [ "$(field "$out" transport)" != "$CARRIER" ]; then
    cat "/tmp/$n.migrate.err" "/tmp/$n.carrier.err"; return 1
  fi
  [ "$(field "$out" dest_runstate)" = paused ] || { echo "destination $n is not paused after the hop"; return 1; }
  same_memory "$prev" "$n" || return 1
  say "guest memory of $n equals $prev's ($MEM MiB)"
  $L qemu qmp --qmp "/tmp/$n.qmp" cont > /dev/null || return 1
  goes_on "$n" || return 1
  echo "QEMU_HOP hop=$hop way=livemig-$CARRIER${1:+-multifd$2} total_ms=$(field "$out" total_ms) downtime_ms=$(field "$out" downtime_ms) ram_bytes=$(field "$out" ram_transferred) mib_s=$(field "$out" throughput_mib_s) handoff=$(field "$out" handoff)"
  stop "$prev"; prev=$n
}

# ram_hop HOP NAME STRATEGY: livemig's engine moves the RAM over verbs (QEMU's stream carries
# the device state only), by post-copy or pre-copy. Pre-copy tracks QEMU's writes with QEMU's
# own dirty log here (--dirty-log auto: this guest's 6.1 kernel has no asynchronous userfaultfd
# write-protect nor PAGEMAP_SCAN); its destination starts paused, and its memory must equal
# the source's before it runs (a write the log missed would show).
ram_hop() {
  hop=$1; n=$2; strategy=$3
  say "hop $hop: $prev -> $n, livemig external RAM over verbs ($strategy)"
  if [ "$strategy" = precopy ]; then guest "$n" incoming paused || exit 1; else guest "$n" incoming || exit 1; fi
  addr=$(carrier "$n") || return 1
  out=$($L qemu migrate --src-qmp "/tmp/$prev.qmp" --to "$addr" --secret-file /tmp/secret --transport verbs \
     --socket-dir /tmp --max-time 240 --ram livemig --strategy "$strategy" --dirty-log auto --json 2> "/tmp/$n.migrate.err")
  rc=$?
  echo "$out"
  wait "$(cat "/tmp/$n.carrier.pid")" 2>/dev/null
  if [ $rc -ne 0 ] || [ "$(field "$out" transport)" != verbs ] || [ -z "$(field "$out" checksum)" ]; then
    cat "/tmp/$n.migrate.err" "/tmp/$n.carrier.err"; return 1
  fi
  if [ "$strategy" = precopy ]; then
    [ "$(field "$out" dest_runstate)" = paused ] || { echo "destination $n is not paused after the hop"; return 1; }
    same_memory "$prev" "$n" || return 1
    say "guest memory of $n equals $prev's ($MEM MiB)"
    $L qemu qmp --qmp "/tmp/$n.qmp" cont > /dev/null || return 1
  fi
  goes_on "$n" || return 1
  echo "QEMU_HOP hop=$hop way=livemig-external-ram-$strategy-verbs tracker=$(field "$out" tracker) total_ms=$(field "$out" total_ms) paused_ms=$(field "$out" stop_to_resume_ms)"
  stop "$prev"; prev=$n
}

# qemu_hop HOP NAME URI: QEMU's own migration to URI, from $prev into a new QEMU NAME.
qemu_hop() {
  hop=$1; n=$2; uri=$3
  say "hop $hop: $prev -> $n, QEMU's own $uri"
  guest "$n" incoming || exit 1
  # A carrier's multifd hop leaves the capability set; QEMU's default bandwidth cap would
  # measure the cap: lift it.
  $L qemu qmp --qmp "/tmp/$prev.qmp" migrate-set-capabilities \
    '{"capabilities":[{"capability":"multifd","state":false}]}' > /dev/null || return 1
  $L qemu qmp --qmp "/tmp/$n.qmp" migrate-incoming "{\"uri\":\"$uri\"}" > /dev/null || return 1
  $L qemu qmp --qmp "/tmp/$prev.qmp" migrate-set-parameters '{"max-bandwidth":107374182400}' > /dev/null
  $L qemu qmp --qmp "/tmp/$prev.qmp" migrate "{\"uri\":\"$uri\"}" > /dev/null || return 1
  out=$($L qemu qmp --qmp "/tmp/$prev.qmp" query-migrate --until 'status=completed|failed|cancelled' --within 240)
  echo "$out"
  tt=$(field "$out" total-time); b=$(field "$out" transferred | head -1)
  fig="total_ms=$tt downtime_ms=$(field "$out" downtime) ram_bytes=$b mib_s=$(awk -v b="${b:-0}" -v t="${tt:-0}" 'BEGIN{printf "%.1f", (t > 0 ? b / 1048576 / (t / 1000) : 0)}')"
  if [ "$(field "$out" status)" != completed ]; then
    echo "QEMU_HOP hop=$hop way=qemu-${uri%%:*} outcome=failed-at-source $fig"
    return 1
  fi
  if ! goes_on "$n" 60; then
    sleep 3; grep -m1 -B2 -A40 'BUG\|Oops\|general protection\|RIP:' "/tmp/$n.serial" || tail -20 "/tmp/$n.serial"
    echo "QEMU_HOP hop=$hop way=qemu-${uri%%:*} outcome=completed-but-destination-guest-stopped $fig"
    return 1
  fi
  echo "QEMU_HOP hop=$hop way=qemu-${uri%%:*} outcome=ok $fig"
  stop "$prev"; prev=$n
}

prev=a
[ "$LAST_HOP" = 0 ] && settle
# Required: livemig's ways, then QEMU's tcp: (the baseline), and the guest runs on after.
if carrier_hop 1 b; then hop_ok 1; else hop_failed 1; exit 1; fi
if [ "$LAST_HOP" -ge 2 ] && [ "$CARRIER" = verbs ]; then
  if ram_hop 2 c postcopy; then hop_ok 2; else hop_failed 2; exit 1; fi
  if ram_hop 2b c2 precopy; then hop_ok 2b; else hop_failed 2b; exit 1; fi
fi
if qemu_hop 3 d "tcp:127.0.0.1:4445"; then hop_ok 3; else cat /tmp/d.err; hop_failed 3; exit 1; fi
c=$(counter "$prev")
if wait_counter "$prev" $((c + ${SETTLE:-15})) $((${SETTLE:-15} * 4)); then
  say "guest $prev runs on (counter $(counter "$prev"))"
else
  fail=1
fi
[ "$LAST_HOP" -le 3 ] && { stop "$prev"; say "done (fail=$fail)"; exit $fail; }

# Required too: the carrier's multifd over verbs, every connection handed to QEMU.
if carrier_hop 4 e --multifd 2; then hop_ok 4; else hop_failed 4; exit 1; fi
[ "$LAST_HOP" -le 4 ] && { stop "$prev"; say "done (fail=$fail)"; exit $fail; }
# Reported, not required: QEMU's own rdma:.
if qemu_hop 5 f "rdma:$ADDR:4444"; then
  say "hop 5 (QEMU's rdma:) ok"
else
  say "hop 5 (QEMU's rdma:) did not succeed (reported above)"
fi
stop "$prev"
say "done (fail=$fail)"
exit $fail
