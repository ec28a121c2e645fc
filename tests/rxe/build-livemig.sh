#!/usr/bin/env bash
# build-livemig.sh — builds the livemig binary (cargo's arguments pass through, e.g.
# --release) and prints its path; used by the scripts here to put it in the guest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
BIN=$(cargo build "$@" -p livemig --message-format=json \
  | python3 -c 'import sys, json
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "livemig":
        print(m["executable"])')
[[ -n $BIN ]] || { echo "building the livemig binary failed" >&2; exit 1; }
echo "$BIN"
