#!/usr/bin/env bash
# livemig TCP page transfer vs iperf3, measured in the same run on loopback.
#
#   bench/tcp-vs-iperf3.sh            (env: DURATION=5 SIZE=256M WINDOW=2048 LIVEMIG_BIN=...)
#
# Prints iperf3 single-stream throughput, livemig `bench pages` throughput for several
# dirty patterns, the ratio livemig/iperf3 and the memcpy ceiling, then the cost of TLS 1.3
# (`--tls`) against plain livemig in the same run. Target (not asserted): 4 KiB pages, random
# pattern, ratio >= 1.0.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
SIZE=${SIZE:-256M}
BIN=${LIVEMIG_BIN:-${LIVEMIG:-target/release/livemig}}
WINDOW=${WINDOW:-2048}
# Built unless a binary was given (a stale one would lack newer flags).
[[ -n ${LIVEMIG_BIN:-${LIVEMIG:-}} ]] || cargo build --release -p livemig >&2
command -v iperf3 >/dev/null || { echo "iperf3 missing (apt-get install iperf3)" >&2; exit 1; }

port=$((20000 + RANDOM % 20000))
iperf3 -s -1 -p "$port" >/dev/null 2>&1 &
srv=$!
trap 'kill $srv 2>/dev/null || true' EXIT
sleep 0.5
iperf_gbps=$(iperf3 -c 127.0.0.1 -p "$port" -t "$DURATION" -J |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)')
wait $srv 2>/dev/null || true

printf '%-34s %10s %8s %10s %9s %9s\n' "run" "Gbit/s" "ratio" "pages/s" "pages/WR" "memcpy"
printf '%-34s %10.2f %8s %10s %9s %9s\n' "iperf3 -c 127.0.0.1 (1 stream)" "$iperf_gbps" "1.00" "-" "-" "-"
run() {  # label, extra args
  local label=$1; shift
  "$BIN" bench pages --loopback --transport tcp --size "$SIZE" --duration "$DURATION" --window "$WINDOW" --json "$@" 2>/dev/null |
    python3 -c '
import json, sys
d = json.load(sys.stdin); base = float(sys.argv[2])
print("%-34s %10.2f %8.2f %10.0f %9.2f %7.2fGB/s%s" % (sys.argv[1], d["gbits_per_s"], d["gbits_per_s"] / base,
      d["pages_per_s"], d["coalescing_ratio"], d["memcpy_gbytes_per_s"], "" if d["checksum_match"] else "  CHECKSUM MISMATCH"))
' "$label" "$iperf_gbps"
}
run "livemig 4K random (target >= 1.0x)" --pattern random
run "livemig 4K random, no coalescing" --pattern random --no-coalesce
run "livemig 4K random, 2 streams" --pattern random --streams 2
run "livemig 4K runs:16" --pattern runs:16
run "livemig 4K seq (2 MiB writes)" --pattern seq
# TLS 1.3 (rustls, no kTLS in this kernel): the same runs through the TLS tunnel; the ratio
# column is against iperf3, and the line below gives TLS against plain livemig.
plain=$(run "livemig 4K random (plain, again)" --pattern random)
tls=$(run "livemig 4K random, --tls" --pattern random --tls)
echo "$plain"; echo "$tls"
run "livemig 4K seq, --tls" --pattern seq --tls
python3 - "$plain" "$tls" <<'PY'
import sys
g = lambda line: float(line.split()[-5]) if line.split() else 0.0
p, t = g(sys.argv[1]), g(sys.argv[2])
print("TLS cost, 4K random: %.2f Gbit/s with TLS vs %.2f plain = %.2fx" % (t, p, t / p if p else float("nan")))
PY
