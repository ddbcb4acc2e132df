#!/usr/bin/env bash
# Ready this checkout for an evaluation sweep on a lent GPU machine (the `device` tool), which
# receives only the checkout (64 MiB at most, `shared/` inside it included) and cannot fetch.
#
#   benchmarks/device/prepare.sh            # here, once: data, wheels, the authors' phi
#   then the device tool: command "bash benchmarks/device/lease.sh 560 priority:0,1",
#   carry [".whl", "runs/authors-phi"]. The *.ckpt files of stopped runs travel with the tree
#   once committed (benchmarks/save_runs.sh); the *.lock files of this machine's sweeps stay
#   ignored, so they do not make the device skip those runs: stop this machine's sweeps of the
#   same grids first (pkill -TERM -f benchmarks/transfer.py; save_runs.sh), or they train twice.
#   TARGET_DATASETS="cifar10 fashion-mnist mnist-10k omniglot" for the datasets grid.
#
# What it puts in place (all git-ignored through .git/info/exclude, never committed):
#   shared/data/{cifar10,fashion-mnist}   the two priority targets (~39 MB of parquet)
#   .whl/                                 datasets and the two packages it needs that the
#                                         device image lacks (dill, multiprocess), for Python 3.12
#   runs/authors-phi                      the authors' phi, converted (comparison only)
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .git/info && touch .git/info/exclude
for path in /shared/ /.whl/; do
  grep -qxF "$path" .git/info/exclude || echo "$path" >> .git/info/exclude
done
mkdir -p shared/data
for name in ${TARGET_DATASETS:-cifar10 fashion-mnist}; do
  rm -rf "shared/data/$name" && cp -r "../shared/data/$name" "shared/data/$name"
done
rm -rf .whl && mkdir .whl
datasets_version=$(.venv/bin/python -c "import datasets; print(datasets.__version__)")
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "datasets==$datasets_version" dill multiprocess
if [ ! -f runs/authors-phi/model.safetensors ]; then
  .venv/bin/python -m metaperturb convert ../shared/reference/official-perturb_750.pth runs/authors-phi
fi
du -sh shared .whl runs/authors-phi
echo "tracked + shared + carried: $(( $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) / 1048576 )) MiB tracked"
