#!/usr/bin/env bash
# One lent GPU call that does everything a lease is for, in order of how much it needs a quiet
# GPU: the overhead table timed alone (benchmarks/overhead.py), then every pending run of
# the named grids at once, one process per run (at most PROCESSES=14 in all, each taking
# every N-th run of its grid) under MPS, beside the CUDA tests.
#
#   here:   benchmarks/device/prepare.sh
#   device: command "bash benchmarks/device/lease.sh 560 tune placement:0,1"
#           (seconds for the whole script; grids as NAME or NAME:SEEDS), carry [".whl", "runs/authors-phi"]
#   here:   for f in FILES_AT/*.tar; do tar -xf "$f"; done; python benchmarks/transfer_report.py
#
# Results are packed into $OUT every minute (checks.tar: test log, timing tables, GPU use;
# results-<k>.tar: each run's result, checkpoint and log), so a call cut off at its limit still
# hands back what was done. PROFILE=1 also profiles the wrapped steps (profile_step.py),
# FORMS=1 times phi's convolution forms, COMPILE=1 with
# torch.compile'd models (give them TIMING_SECONDS=300). STEPS=N (a dry run: other run ids),
# DEVICE=cpu and CHECKS=0 for a rehearsal on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/../.."
budget=$1; shift
began=$(date +%s)
source benchmarks/device/env.sh
device=${DEVICE:-cuda}
results=${RESULTS_DIR:-benchmarks/results/transfer}
logs=/tmp/lease-logs; mkdir -p "$results" "$logs"
touch /tmp/lease-start
left() { echo $(( budget - ($(date +%s) - began) )); }

[ "$device" = cuda ] && source benchmarks/device/gpu.sh

"$python" benchmarks/device/pack.py "$out" "$results" "$logs" /tmp/lease-start --every 60 &
packer=$!

# 1. Timings on a quiet GPU, bounded so that the runs keep most of the call: the overhead table
#    (the Triton site beside the default path), with PROFILE=1 a profile of the wrapped steps,
#    with FORMS=1 phi's convolution forms (COMPILE=1: also torch.compile'd models).
timing() {  # LOG RESULT_FILES SCRIPT ARGS...: one timing script, its output and tables kept
  local log=$1 files=$2; shift 2
  (cd benchmarks && timeout --signal=TERM "${TIMING_SECONDS:-150}" "$python" "$@" \
    --device "$device") > "$logs/$log" 2>&1
  local status=$?
  echo "$1 exit status $status"
  # Only tables this call wrote (the checkout holds earlier ones under the same names).
  find benchmarks/results -maxdepth 1 -name "$files" -newer /tmp/lease-start \
    -exec cp {} "$logs/" \;
  return "$status"
}
if [ "${CHECKS:-1}" = 1 ]; then
  timing overhead.log "overhead-$device.*" overhead.py --no-reference --repeats 3 --steps 3
  status=$?
  if [ "$status" != 0 ] && [ "$status" != 124 ]; then  # a failing Triton site must not cost the table
    timing overhead-without-triton.log "overhead-$device.*" overhead.py --no-reference \
      --no-triton --repeats 3 --steps 3
  fi
  [ -n "${PROFILE:-}" ] && timing profile.log "profile-$device.txt" profile_step.py
  # shellcheck disable=SC2086
  [ -n "${FORMS:-}" ] && timing conv-forms.log "conv-forms-$device.*" conv_forms.py --repeats 3 \
    --steps 3 ${COMPILE:+--compile}
fi

# 2. The runs, one process each, stopped 30 s before the end; the CUDA tests beside them.
if [ "${CHECKS:-1}" = 1 ]; then
  timeout "$(( $(left) - 40 ))" "$python" -m pytest -q -p no:cacheprovider tests/test_fast_path.py \
    tests/test_train.py tests/test_transfer.py tests/test_triton.py -k "cuda or gpu" \
    > "$logs/cuda-tests.log" 2>&1 &
fi
seconds=$(( $(left) - 30 ))
echo "runs get $seconds s"
steps=${STEPS:+--steps $STEPS}
runs=()
for spec in "$@"; do
  grid=${spec%%:*}; seeds=0
  [ "$grid" != "$spec" ] && seeds=${spec#*:}
  seeds=${seeds//,/ }
  # shellcheck disable=SC2086
  count=$("$python" benchmarks/transfer.py "$grid" --list --seeds $seeds --data-root shared/data \
    --output-dir "$results" $steps 2>/dev/null | wc -l)
  # At most PROCESSES (14; the machine has 16 cores) in all: a later grid gets what is left, at
  # least one process.
  free=$(( ${PROCESSES:-14} - ${#runs[@]} )); free=$(( free < 1 ? 1 : free ))
  shards=$(( count < free ? count : free ))
  echo "$grid (seeds $seeds): $count runs in $shards processes"
  for (( i = 0; i < shards; i++ )); do
    # shellcheck disable=SC2086
    timeout --signal=TERM "$seconds" "$python" benchmarks/transfer.py "$grid" --seeds $seeds \
      --shard "$i/$shards" --data-root shared/data --device "$device" --threads 1 \
      --checkpoint-every 250 --output-dir "$results" $steps > "$logs/$grid-$i.log" 2>&1 &
    runs+=($!)
  done
done
wait "${runs[@]}"
kill "$packer" 2>/dev/null; wait "$packer" 2>/dev/null
"$python" benchmarks/device/pack.py "$out" "$results" "$logs" /tmp/lease-start
tail -n 2 "$logs"/*.log
ls -la "$out"
