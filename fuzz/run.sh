#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 20) each. cargo-fuzz needs nightly features;
# RUSTC_BOOTSTRAP=1 enables them on the stable toolchain this project is built with.
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH=${1:-20}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for t in $(cargo fuzz list); do
  echo "== fuzz $t (${SECONDS_EACH}s)"
  mkdir -p corpus/$t
  # Committed seeds (valid inputs a fuzzer would take long to find, such as JSON manifests).
  if [[ -d seeds/$t ]]; then cp -n seeds/$t/* corpus/$t/; fi
  cargo fuzz run "$t" -- -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 corpus/$t 2>&1 | tail -n 3
done
