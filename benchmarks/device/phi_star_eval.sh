#!/usr/bin/env bash
# On a lent GPU machine, in one call: `select`'s meta-tests of the phi* candidates and the
# priority evaluation (seed 0) of Base, the authors' phi and every candidate, all at once.
#
#   here:   benchmarks/device/prepare.sh
#   device: command "bash benchmarks/device/phi_star_eval.sh 570" (seconds for the whole script),
#           carry [".whl", "runs/authors-phi", "runs/phi-star/seed-0/phi", "runs/phi-star/seed-1/phi"]
#   here:   for f in FILES_AT/*.tar; do tar -xf "$f"; done
#           python benchmarks/phi_star.py select    # reads the meta-tests back, writes the report
#
# $OUT gets shards-{0..3}.tar (evaluation results or checkpoints of stopped runs),
# selection.tar (runs/phi-star/selection/meta-tests) and gpu.csv (utilisation every 15 s).
set -uo pipefail
cd "$(dirname "$0")/../.."
budget=$1
began=$(date +%s)
source benchmarks/device/env.sh
# Several small processes on one GPU: MPS lets their kernels run side by side. Kept only if a
# CUDA program works under it within a minute.
rm -f /tmp/sweep-start
if command -v nvidia-cuda-mps-control > /dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p /tmp/mps /tmp/mps-log
  if nvidia-cuda-mps-control -d && timeout 60 "$python" -c \
    "import torch; print('MPS ok', (torch.ones(2, device='cuda') + 1).sum().item())"; then
    echo "MPS on"
  else
    echo quit | timeout 10 nvidia-cuda-mps-control; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    echo "MPS unavailable: processes share the GPU by time slices"
  fi
fi
seconds=$(( budget - ($(date +%s) - began) - 30 ))  # 30 s to pack up at the end
echo "runs get $seconds s"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 15 > "$out/gpu.csv" 2>&1 &
sampler=$!
candidates=()
for phi in runs/phi-star/seed-*/phi; do
  [ -f "$phi/model.safetensors" ] && candidates+=(--phi "phi-star-$(basename "$(dirname "$phi")")=$phi")
done
echo "candidates: ${candidates[*]}"
timeout --signal=TERM "$seconds" "$python" benchmarks/phi_star.py select --data shared/data/cifar10 \
  > /tmp/select.log 2>&1 &
selection=$!
# s-Fashion-MNIST gives way to s-CIFAR10 and the selection if not everything can finish.
"$python" benchmarks/device/watchdog.py "$seconds" benchmarks/results/transfer s-fashion-mnist \
  > /tmp/watchdog.log 2>&1 &
PACKS=4 bash benchmarks/device/sweep.sh priority "$seconds" --seeds 0 \
  --checkpoint-every 250 "${candidates[@]}"
wait "$selection"; echo "select exit status $?"
kill "$sampler" 2>/dev/null
mkdir -p runs/phi-star/selection
cp /tmp/select.log runs/phi-star/selection/device-select.log
cp /tmp/watchdog.log runs/phi-star/selection/device-watchdog.log
tar -cf "$out/selection.tar" runs/phi-star/selection
tail -n 5 /tmp/select.log
cat /tmp/watchdog.log
