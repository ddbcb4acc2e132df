#!/usr/bin/env bash
# Commit the checkpoints of evaluation runs stopped part-way, on the current branch (main), so
# that a later session resumes them from wherever it starts.
#
#   pkill -TERM -f benchmarks/transfer.py   # each running run checkpoints the step it is at
#   benchmarks/save_runs.sh                 # commit benchmarks/results/transfer/*.ckpt
#                                           # (MIN_STEPS=200: earlier ones are dropped)
#
# Why on main: a session may start from a fresh checkout that holds main and nothing else (the
# side branch that used to keep these was lost that way on 2026-11-28, with three runs' hours).
# A ResNet-20 run's checkpoint is 3.4 MB (weights and Adam state); a run that finishes deletes
# its checkpoint, and the next save commits that deletion. Meta-training checkpoints (35 MB: ten
# task networks) are too large for main: a finished meta-training run keeps its phi and metrics
# in benchmarks/results/phi-star/ instead (`python benchmarks/phi_star.py status`).
set -euo pipefail
cd "$(dirname "$0")/.."
checkpoints='benchmarks/results/transfer/*.ckpt'
if pgrep -f benchmarks/transfer.py > /dev/null; then
  echo "warning: a sweep is still running; its checkpoint may be older than its progress" >&2
fi
# A run stopped in its first steps (say a sweep stopped just after moving on to its next run) is
# cheaper to redo than to keep 3.4 MB in the history for: its checkpoint is deleted instead.
"${PYTHON:-.venv/bin/python}" - "${MIN_STEPS:-200}" <<'PY'
import glob, os, sys

import torch

least = int(sys.argv[1])
for path in sorted(glob.glob("benchmarks/results/transfer/*.ckpt")):
    step = int(torch.load(path, map_location="cpu", weights_only=True)["step"])
    if step < least:
        os.remove(path)
        print(f"dropped {os.path.basename(path)}: step {step} < {least}, cheaper to redo than keep")
PY
# git refuses a pathspec that matches nothing, neither a file nor a committed checkpoint.
if compgen -G "$checkpoints" > /dev/null || [ -n "$(git ls-files -- "$checkpoints")" ]; then
  git add -A -f -- "$checkpoints"
fi
if git diff --cached --quiet -- "$checkpoints"; then
  echo "no evaluation checkpoint changed"
  exit 0
fi
git commit -q -m "State of the evaluation runs stopped part-way ($(date -u +%FT%TZ))" -- "$checkpoints"
git show --stat --format=%s HEAD
