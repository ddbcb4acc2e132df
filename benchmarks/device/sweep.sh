#!/usr/bin/env bash
# On a lent GPU machine: run one grid of benchmarks/transfer.py as 8 processes sharing the GPU,
# stop them before the call's time limit, and hand results and checkpoints back through $OUT.
#
#   bash benchmarks/device/sweep.sh GRID SECONDS [extra transfer.py flags]
#
# Each shard writes into benchmarks/results/transfer/ (carried in, so finished runs are skipped
# and stopped ones resume from their checkpoints); at the end the shards' new files are packed
# into $OUT/shards-<k>.tar, k = shard mod PACKS (PACKS=8 by default; a call returns 8 files at
# most, 16 MiB each, and a stopped run's checkpoint is ~3.4 MB). Unpack here with
#   for f in FILES_AT/shards-*.tar; do tar -xf "$f"; done
set -uo pipefail
cd "$(dirname "$0")/../.."
grid=$1; seconds=$2; shift 2
source benchmarks/device/env.sh
results=${RESULTS_DIR:-benchmarks/results/transfer}
mkdir -p "$results"
touch /tmp/sweep-start
for i in 0 1 2 3 4 5 6 7; do
  timeout --signal=TERM "$seconds" "$python" benchmarks/transfer.py "$grid" --shard "$i/8" \
    --data-root shared/data --device "${DEVICE:-cuda}" --threads "${THREADS:-2}" --output-dir "$results" "$@" > "/tmp/shard-$i.log" 2>&1 &
done
wait
for i in 0 1 2 3 4 5 6 7; do
  cp "/tmp/shard-$i.log" "$results/device-shard-$i.log"
done
# Each shard's runs are every 8th of the grid: pack what changed since the start, by shard.
"$python" - "$grid" "$out" "$results" "${PACKS:-8}" "$@" <<'PY'
import subprocess, sys, tarfile
from pathlib import Path
grid, out, results, packs = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
ids = subprocess.run(
    [sys.executable, "benchmarks/transfer.py", grid, "--list", "--data-root", "shared/data", *sys.argv[5:]],
    capture_output=True, text=True, check=True,
).stdout.split()[1::2]
start = Path("/tmp/sweep-start").stat().st_mtime
for pack in range(packs):
    with tarfile.open(out / f"shards-{pack}.tar", "w") as tar:
        for shard in range(pack, 8, packs):
            for run_id in ids[shard::8]:
                for suffix in (".json", ".ckpt"):
                    path = results / f"{run_id}{suffix}"
                    if path.is_file() and path.stat().st_mtime >= start:
                        tar.add(path)
            tar.add(results / f"device-shard-{shard}.log")
PY
nvidia-smi --query-gpu=name,memory.used --format=csv || true
tail -n 3 /tmp/shard-*.log
