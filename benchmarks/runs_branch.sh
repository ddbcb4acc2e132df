#!/usr/bin/env bash
# Keep long runs' state (checkpoints, metrics) in git without putting it on main.
#
#   benchmarks/runs_branch.sh save     # commit runs/phi-star, evaluation checkpoints
#                                      # (benchmarks/results/transfer/*.ckpt) and the networks
#                                      # of benchmarks/update_bn.py to the branch
#                                      # `phi-star-runs` (main's tree is untouched)
#   benchmarks/runs_branch.sh restore  # put them back under runs/ (ignored on main)
#
# Why a side branch: a meta-training checkpoint is ~35 MB (10 task networks and their Adam
# states); on main it would bloat every clone and push the working tree past the 64 MiB that a
# device call may carry. The branch holds only the latest state (one commit, no history).
set -euo pipefail
cd "$(dirname "$0")/.."
branch=phi-star-runs
case "${1:-}" in
  save)
    index=$(mktemp)
    trap 'rm -f "$index"' EXIT
    export GIT_INDEX_FILE="$index"
    git read-tree --empty
    git add -f runs/phi-star
    # Evaluation runs stopped part-way (their finished results live on main).
    git add -f benchmarks/results/transfer/*.ckpt 2>/dev/null || true
    # The trained networks benchmarks/update_bn.py evaluates (and its checkpoints).
    git add -f benchmarks/results/update-bn/*.pt 2>/dev/null || true
    git add -f benchmarks/results/update-bn/*.ckpt 2>/dev/null || true
    tree=$(git write-tree)
    # No parent: the branch holds the latest state only, so older checkpoints become
    # unreachable and `git gc` can drop them.
    commit=$(git commit-tree "$tree" -m "runs/phi-star state $(date -u +%FT%TZ)")
    git update-ref "refs/heads/$branch" "$commit"
    git ls-tree -r --name-only "$branch" | sed 's/^/saved: /'
    ;;
  restore)
    git archive "$branch" | tar -x
    echo "restored runs/ (and any evaluation checkpoints) from $branch"
    ;;
  *)
    echo "usage: $0 save|restore" >&2
    exit 2
    ;;
esac
