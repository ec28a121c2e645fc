#!/usr/bin/env bash
# The image repository's two backends side by side on this machine: a local directory, and an
# S3 server (s3s-fs) on loopback. For each: push an image (DATA_MIB of random data in SIZE),
# export it, read it whole through a lazy `image serve` (nbdcopy: every chunk fetched on first
# touch), write MOD_MIB through NBD and CLONE + COMMIT it. Prints seconds, MiB/s and the S3 /
# directory ratio for each step.
#
#   SIZE=1G DATA_MIB=512 MOD_MIB=64 CHUNK=256K PACK=4M bench/image-backends.sh
# (s3s-fs hashes the whole object on every GET: PACK=256K makes its ranged reads cheap)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-1G}
DATA_MIB=${DATA_MIB:-512}
MOD_MIB=${MOD_MIB:-64}
CHUNK=${CHUNK:-256K}
PACK=${PACK:-4M}
command -v s3s-fs >/dev/null || PATH=$PATH:${CARGO_HOME:-$HOME/.cargo}/bin
command -v s3s-fs >/dev/null || { echo "s3s-fs is missing (scripts/install-deps.sh)" >&2; exit 1; }
cargo build --release -q -p livemig
BIN=$PWD/target/release/livemig
OUT=${OUT:-$(mktemp -d)}
cd "$OUT"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
head -c "$((DATA_MIB << 20))" /dev/urandom >src.img
truncate -s "$SIZE" src.img
MIB=$(( $(stat -c %s src.img) >> 20 ))

mkdir -p s3root/livemig
PORT=$((20000 + RANDOM % 20000))
s3s-fs --host 127.0.0.1 --port "$PORT" --access-key livemig --secret-key livemig-bench-secret s3root >s3.log 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.1; done
export AWS_ENDPOINT=http://127.0.0.1:$PORT AWS_ACCESS_KEY_ID=livemig AWS_SECRET_ACCESS_KEY=livemig-bench-secret AWS_REGION=us-east-1

now() { date +%s.%N; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.2f", a - b }'; }
printf 'backend\tstep\tseconds\tMiB\n' >backends.tsv
for backend in dir s3; do
  if [[ $backend == dir ]]; then export LIVEMIG_REPO=$OUT/repo; else export LIVEMIG_REPO=s3://livemig/images; fi
  t=$(now); "$BIN" image push src.img img --chunk-size "$CHUNK" --pack-size "$PACK" --json >push-$backend.json
  printf '%s\tpush\t%s\t%s\n' $backend "$(since "$t")" "$DATA_MIB" >>backends.tsv
  t=$(now); "$BIN" image export img exp-$backend.raw --json >export-$backend.json
  printf '%s\texport\t%s\t%s\n' $backend "$(since "$t")" "$DATA_MIB" >>backends.tsv
  cmp src.img exp-$backend.raw || { echo "export differs ($backend)" >&2; exit 1; }
  rm -f exp-$backend.raw
  "$BIN" image serve img --local lazy-$backend.img --socket lazy-$backend.sock --control lazy-$backend.ctl >serve-$backend.out 2>serve-$backend.err &
  SP=$!; PIDS+=($SP)
  for _ in $(seq 200); do grep -q listening serve-$backend.out 2>/dev/null && break; sleep 0.05; done
  t=$(now); nbdcopy "nbd+unix:///?socket=$OUT/lazy-$backend.sock" read-$backend.raw
  printf '%s\tlazy read (whole disk)\t%s\t%s\n' $backend "$(since "$t")" "$MIB" >>backends.tsv
  cmp src.img read-$backend.raw || { echo "lazy read differs ($backend)" >&2; exit 1; }
  rm -f read-$backend.raw
  qemu-io -f raw -c "write -P 0x5a 0 ${MOD_MIB}M" "nbd+unix:///?socket=$OUT/lazy-$backend.sock" >/dev/null
  t=$(now)
  "$BIN" image clone img snap --control lazy-$backend.ctl --json >clone-$backend.json
  "$BIN" image commit snap --control lazy-$backend.ctl --json >commit-$backend.json
  printf '%s\tclone+commit\t%s\t%s\n' $backend "$(since "$t")" "$MOD_MIB" >>backends.tsv
  kill "$SP"; wait "$SP" 2>/dev/null || true
done
echo
echo "== image repository backends: ${MIB} MiB image, $DATA_MIB MiB of data, chunks of $CHUNK in packs of $PACK, $MOD_MIB MiB committed"
awk -F'\t' 'NR > 1 { k = $2; if ($1 == "dir") { d[k] = $3; m[k] = $4; order[++n] = k } else s[k] = $3 }
  END { printf "%-24s %10s %10s %10s %10s %8s\n", "step", "dir s", "dir MiB/s", "s3 s", "s3 MiB/s", "s3/dir";
        for (i = 1; i <= n; i++) { k = order[i];
          printf "%-24s %10.2f %10.0f %10.2f %10.0f %7.2fx\n", k, d[k], m[k] / d[k], s[k], m[k] / s[k], s[k] / d[k] } }' backends.tsv
echo "results in $OUT"
