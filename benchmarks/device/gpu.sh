# Sourced by the device scripts on a GPU, after setting $logs: several small processes on one
# GPU run their kernels side by side under MPS (kept only if a CUDA program works under it
# within a minute; a second call on a warm machine finds the daemon the first one started), and
# the GPU's use is logged every 15 s to $logs/gpu.csv.
if command -v nvidia-cuda-mps-control > /dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p /tmp/mps /tmp/mps-log
  nvidia-cuda-mps-control -d 2> /dev/null
  if pgrep -f "nvidia-cuda-mps-control -d" > /dev/null && timeout 60 "$python" -c \
    "import torch; print('MPS ok', (torch.ones(2, device='cuda') + 1).sum().item())"; then
    echo "MPS on"
  else
    echo quit | timeout 10 nvidia-cuda-mps-control
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    echo "MPS unavailable: processes share the GPU by time slices"
  fi
fi
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 15 \
    > "$logs/gpu.csv" 2>&1 &
fi
