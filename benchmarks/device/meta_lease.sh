#!/usr/bin/env bash
# One lent GPU call that meta-trains phi* candidates, the paper's recipe, one process per seed
# under MPS (benchmarks/phi_star.py train), and hands the finished runs back.
#
#   here:   python benchmarks/device/compact_source.py ../shared/data/tiny-imagenet-200-32px .source
#           mv shared /tmp/shared-aside   # the call carries 64 MiB: Tiny ImageNet (53 MiB) alone
#   device: command "bash benchmarks/device/meta_lease.sh 560 4 5 6" (seconds, seeds),
#           carry [".source", ".whl"]
#   here:   mv /tmp/shared-aside shared; tar -xf FILES_AT/runs.tar
#           python benchmarks/phi_star.py status; python benchmarks/phi_star.py select
#           git add benchmarks/results/phi-star*; git commit   # runs/ does not outlive the session
#
# $OUT/runs.tar, packed every minute: each run's metrics log, config, task split and, once it
# finishes, its phi (a stopped run's checkpoint, 35 MB of task networks and optimiser state, is
# too large to come back, so a run that does not finish in the call is lost). $OUT/logs.tar: the
# processes' logs and the GPU's use. DEVICE=cpu STEPS=N for a rehearsal without a GPU.
# PLACEMENT=before_activation meta-trains phi where the authors put it (runs preact-seed-<k>).
set -uo pipefail
cd "$(dirname "$0")/../.."
budget=$1; shift
began=$(date +%s)
source benchmarks/device/env.sh
device=${DEVICE:-cuda}
runs_dir=${RUNS_DIR:-runs/phi-star}
placement=${PLACEMENT:-output}
prefix=$([ "$placement" = before_activation ] && echo preact-)
logs=/tmp/meta-logs; mkdir -p "$logs" "$runs_dir"
source_data=.source/tiny-imagenet-200-32px
[ -f "$source_data/train.parquet" ] || { echo "no $source_data/train.parquet: see the header"; exit 1; }
[ "$device" = cuda ] && source benchmarks/device/gpu.sh

pack() {
  local runs=()
  for seed in "$@"; do
    [ -d "$runs_dir/${prefix}seed-$seed" ] && runs+=("$runs_dir/${prefix}seed-$seed")
  done
  [ ${#runs[@]} -gt 0 ] && tar -cf "$out/runs.partial" --exclude=checkpoint.pt --exclude='*.partial' \
    "${runs[@]}" && mv "$out/runs.partial" "$out/runs.tar"
  tar -cf "$out/logs.partial" -C "$logs" . && mv "$out/logs.partial" "$out/logs.tar"
}

seconds=$(( budget - ($(date +%s) - began) - 20 ))
echo "runs get $seconds s"
pids=()
for seed in "$@"; do
  # shellcheck disable=SC2086
  timeout --signal=TERM "$seconds" "$python" benchmarks/phi_star.py --runs-dir "$runs_dir" train \
    --seeds "$seed" --data "$source_data" --threads 1 --placement "$placement" ${STEPS:+--steps $STEPS} \
    > "$logs/seed-$seed.log" 2>&1 &
  pids+=($!)
done
while pgrep -f "benchmarks/phi_star.py --runs-dir $runs_dir train" > /dev/null; do
  sleep 30
  pack "$@"
done
wait "${pids[@]}"
pack "$@"
for seed in "$@"; do
  printf 'seed %s: %s\n' "$seed" \
    "$([ -f "$runs_dir/${prefix}seed-$seed/phi/model.safetensors" ] && echo finished || echo NOT finished)"
done
tail -n 3 "$logs"/seed-*.log
ls -la "$out"
