#!/usr/bin/env bash
# livemig verbs page transfer vs perftest's ib_write_bw, on the same Soft-RoCE device in the
# same guest boot (tests/rxe/harness.sh: Debian kernel + rdma_rxe under qemu).
#
#   bench/verbs-vs-ib_write_bw.sh          (DURATION=3 per run)
#
# Prints ib_write_bw at 64 KiB, livemig at 64 KiB writes and the ratio (target >= 0.95), then
# 4 KiB random pages with and without coalescing, then the urgent-page latency during a bulk
# push (`livemig bench urgent`, URGENT_REQUESTS=300) over verbs and, as the baseline, TCP
# loopback. Soft-RoCE under TCG is slow: the figures serve correctness and relative
# comparison. On real HCAs run the same two commands on two
# hosts: `ib_write_bw -d DEV -s 65536 -D 5 [host]` and
# `livemig bench pages --transport verbs --device DEV --page-size 64K --pattern seq
#  --max-write 64K --listen|--connect ...`.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-3}
cargo build --release -p livemig >&2
BIN=$(pwd)/target/release/livemig
G=$(mktemp -d)
trap 'rm -rf "$G"' EXIT
cat > "$G/guest-bench.sh" <<GUEST
#!/bin/sh
D=$DURATION
ib_write_bw -d rxe0 -x 1 -s 65536 -D \$D >/tmp/ibsrv.log 2>&1 &
sleep 1
ib_write_bw -d rxe0 -x 1 -s 65536 -D \$D 127.0.0.1 >/tmp/ibcli.log 2>&1
wait
ib=\$(awk '\$1 == 65536 { print \$4 }' /tmp/ibcli.log | tail -n 1)
echo "RESULT ib_write_bw_64k_MiBps \${ib:-0}"
run() {
  label=\$1; shift
  livemig bench pages --loopback --transport verbs --duration \$D --json "\$@" > /tmp/out.json 2>/tmp/err.log || { cat /tmp/err.log; echo "RESULT \$label FAILED"; return; }
  echo "RESULT \$label \$(tr -d '\n ' < /tmp/out.json)"
}
run livemig_64k --size 64M --page-size 64K --pattern seq --max-write 64K
run livemig_4k_random --size 64M --pattern random
run livemig_4k_random_nocoalesce --size 64M --pattern random --no-coalesce
# Urgent 4 KiB pages while a bulk push saturates the link: the verbs urgent queue pair, and
# TCP loopback's urgent connection in the same guest as the baseline.
for b in verbs tcp; do
  livemig bench urgent --transport \$b --size 32M --requests ${URGENT_REQUESTS:-300} --bulk-secs \$D --json \
    > /tmp/urgent.json 2>/tmp/err.log || { cat /tmp/err.log; echo "RESULT urgent_\$b FAILED"; continue; }
  echo "RESULT urgent_\$b \$(tr -d '\n' < /tmp/urgent.json)"
done
GUEST
chmod +x "$G/guest-bench.sh"
RXE_HARNESS_FILES="$BIN" tests/rxe/harness.sh "$G/guest-bench.sh" | tee "$G/out.log" | grep -v '^RESULT' >&2 || true
python3 - "$G/out.log" <<'PY'
import json, sys
res = {}
for line in open(sys.argv[1]):
    if line.startswith("RESULT "):
        _, k, v = line.rstrip("\n").split(" ", 2)
        res[k] = v
ib = float(res.get("ib_write_bw_64k_MiBps", "0") or 0)
print(f"{'run':40} {'MiB/s':>10} {'ratio':>7} {'pages/WR':>9}")
print(f"{'ib_write_bw -s 65536 (rxe0)':40} {ib:10.1f} {1.0:7.2f} {'-':>9}")
for k in ("livemig_64k", "livemig_4k_random", "livemig_4k_random_nocoalesce"):
    v = res.get(k)
    if not v or v == "FAILED":
        print(f"{k:40} FAILED"); continue
    d = json.loads(v)
    mib = d["bytes"] / d["seconds"] / 2**20
    ratio = mib / ib if ib else float("nan")
    print(f"{k:40} {mib:10.1f} {ratio:7.2f} {d['coalescing_ratio']:9.2f}" + ("" if d["checksum_match"] else "  CHECKSUM MISMATCH"))
print()
print("urgent 4 KiB page while bulk writes saturate the link (same guest)")
print(f"{'transport / mode':44} {'p50 us':>9} {'p99 us':>9} {'max us':>9} {'bulk MiB/s':>11}")
f = lambda v: "-" if v is None else f"{v:.0f}"
for tr in ("verbs", "tcp"):
    v = res.get("urgent_" + tr)
    if not v or v == "FAILED":
        print(f"{tr:44} FAILED"); continue
    for ph in json.loads(v):
        mib = ph["bulk_gbit_s"] * 1e9 / 8 / 2**20
        print(f"{tr + ' / ' + ph['mode']:44} {f(ph['p50_us']):>9} {f(ph['p99_us']):>9} {f(ph['max_us']):>9} {mib:11.1f}")
PY
