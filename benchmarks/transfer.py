"""The evaluation sweeps behind the README's results tables (issue: evaluation harness).

Each grid is a list of ``metaperturb eval`` runs; every run writes
``benchmarks/results/transfer/<run id>.json`` when it ends (and a checkpoint while it runs), and
a finished run is skipped, so a sweep can be stopped and restarted across sessions:

    python benchmarks/transfer.py priority            # ResNet-20, s-CIFAR10 + s-Fashion-MNIST,
                                                      # Base / phi* / authors' phi, seeds 0 and 1
    python benchmarks/transfer.py architectures       # Base vs phi* on 7 networks, s-CIFAR10
    python benchmarks/transfer.py datasets            # every method on every target
    python benchmarks/transfer.py tune                # DropBlock and Mixup settings, on a
                                                      # CIFAR-10 validation slice
    python benchmarks/transfer.py placement           # phi before the blocks' last ReLU
                                                      # (the authors' placement), s-CIFAR10,
                                                      # ResNet-20 and Conv4
    python benchmarks/transfer.py annealing           # phi* without the strength ramp, and
                                                      # ramped over the whole run, s-CIFAR10
    python benchmarks/transfer.py closed-site         # phi* without the last block's site,
                                                      # where its s closes on Omniglot-100, and
                                                      # with closing sites switched off as found
    python benchmarks/transfer.py priority --list     # what would run, and what is done
    python benchmarks/transfer.py priority --phi seed-0=runs/phi-star/seed-0/phi
                                                      # also a phi not installed (a candidate)
    python benchmarks/transfer_report.py              # tables and plots from the results

The paper's schedule (10,000 steps, batch 128) is the default; ``--steps`` shortens it, and the
run ids record the number of steps, so a short sweep never mixes with the reference one.
``--only PATTERN`` keeps the runs whose id matches a shell pattern (``--only 'mnist-10k__*'``).
``--shard I/N`` runs every N-th pending run, for several processes (or GPUs) at once; without
it, sweeps started side by side share the pending runs anyway, each skipping a run another
process holds (its ``<run id>.lock``).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
from fnmatch import fnmatchcase as fnmatch
from pathlib import Path
from typing import Any

import torch

from metaperturb._machine import FLUSH_DENORMAL_HELP, set_up_cpu
from metaperturb._run_lock import lock_holder
from metaperturb.errors import FlushDenormalError, RunInProgressError, TrainingStoppedError
from metaperturb.transfer import (
    TransferConfig,
    find_equivalent_result,
    run_id,
    run_transfer,
    stop_on_signals,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "transfer"
AUTHORS_PTH = ROOT.parent / "shared" / "reference" / "official-perturb_750.pth"
AUTHORS_PHI = ROOT / "runs" / "authors-phi"  # converted here, never committed or shipped
PHI_STAR = ROOT / "weights" / "phi-star"
PRETRAINED = "tiny-imagenet-resnet20"


# Tuning slice: CIFAR-10 train images 500-749 of each class train, 750-999 test; disjoint from
# s-CIFAR10 (the first 500) and from its test split.
def _validation() -> dict[str, Any]:
    return {
        "data": str(DATA / "cifar10"),
        "skip_per_class": 500,
        "per_class": 250,
        "test_split": "train",
        "test_skip_per_class": 750,
        "test_per_class": 250,
    }


# The tuning grids; `datasets` uses the best of each by `tune`'s validation accuracy.
DROPBLOCK_RATES, DROPBLOCK_SIZES, MIXUP_ALPHAS = (0.1, 0.05, 0.2), (3, 5), (1.0, 0.2, 2.0)


def _authors_phi() -> str | None:
    if not (AUTHORS_PHI / "model.safetensors").is_file():
        if not AUTHORS_PTH.is_file():
            return None
        subprocess.run(
            [sys.executable, "-m", "metaperturb", "convert", str(AUTHORS_PTH), str(AUTHORS_PHI)],
            check=True,
        )
    return str(AUTHORS_PHI)


#: Extra phi to evaluate beside phi* and the authors' (``--phi NAME=PATH``): e.g. the phi* runs
#: before `select` has chosen one, so that a lent GPU can evaluate them all at once.
EXTRA_PHI: dict[str, str] = {}


def _phi_methods(include_authors: bool = True) -> list[dict[str, Any]]:
    methods: list[dict[str, Any]] = [{}]
    if (PHI_STAR / "model.safetensors").is_file():
        methods.append({"phi": "default", "phi_name": "phi-star"})
    else:
        print("note: weights/phi-star not installed yet: its runs are left out", file=sys.stderr)
    authors = _authors_phi() if include_authors else None
    if authors is not None:
        methods.append({"phi": authors, "phi_name": "authors"})
    methods += [{"phi": path, "phi_name": name} for name, path in EXTRA_PHI.items()]
    return methods


def grid(name: str, steps: int, seeds: list[int]) -> list[TransferConfig]:
    common: dict[str, Any] = {"data_root": str(DATA), "steps": steps}
    runs: list[TransferConfig] = []
    if name == "priority":
        for target in ("s-cifar10", "s-fashion-mnist"):
            for method in _phi_methods():
                for seed in seeds:
                    # The evaluation-mode comparison (MC-5 and MC-100) on seed 0, whichever
                    # seeds this call runs (so a run's settings do not depend on the call);
                    # phi* also gets MC-100 on seed 1, beside the update_bn eval that every
                    # run records: one forward against 100 on the same network (issue 3).
                    if method and seed == 0:
                        mc = [5, 100]
                    elif method.get("phi_name") == "phi-star" and seed == 1:
                        mc = [100]
                    else:
                        mc = []
                    runs.append(
                        TransferConfig(target=target, seed=seed, mc_samples=mc, **method, **common)
                    )
    elif name == "architectures":
        models = ["conv4", "conv6", "cifar_resnet20", "cifar_resnet44", "cifar_wrn_28_2"]
        models += ["cifar_resnet18", "cifar_mobilenetv2_100"]  # timm's, adapted to 32 px
        for model in models:
            for method in _phi_methods(include_authors=False):
                for seed in seeds:
                    runs.append(
                        TransferConfig(
                            target="s-cifar10", model=model, seed=seed, **method, **common
                        )
                    )
    elif name == "datasets":
        methods = _phi_methods()
        methods += _tuned(steps)
        finetune = _finetune(steps)
        if finetune is not None:
            methods.append(finetune)
            if (PHI_STAR / "model.safetensors").is_file():
                methods.append({**finetune, "phi": "default", "phi_name": "phi-star"})
        for target in ("s-cifar10", "s-fashion-mnist", "mnist-10k", "omniglot-100"):
            for method in methods:
                for seed in seeds:
                    runs.append(TransferConfig(target=target, seed=seed, **method, **common))
    elif name == "placement":
        # Why (issue: evaluation): does phi on the residual sum before the last ReLU (the
        # authors' placement, where their phi was meta-trained) do better than on the block
        # output? Compared with the same runs of `priority`, which use the output; and on Conv4
        # (phi* only), the BatchNorm output before each unit's ReLU, against `architectures`.
        placed = [("cifar_resnet20", m) for m in _phi_methods() if m]
        placed += [("conv4", m) for m in _phi_methods(include_authors=False) if m]
        for model, method in placed:
            for seed in seeds:
                runs.append(
                    TransferConfig(
                        target="s-cifar10",
                        model=model,
                        seed=seed,
                        placement="before_activation",
                        **method,
                        **common,
                    )
                )
    elif name == "annealing":
        # Why (issue: evaluation): does the strength ramp (0 -> 1 over the first 40% of the
        # steps, METHOD.md) matter? phi* at full strength from the start, and ramped over the
        # whole run; compared with `priority`'s phi* runs (0.4).
        for fraction in (0.0, 1.0):
            for seed in seeds:
                runs.append(
                    TransferConfig(
                        target="s-cifar10",
                        seed=seed,
                        phi="default",
                        phi_name="phi-star",
                        ramp_fraction=fraction,
                        **common,
                    )
                )
    elif name == "closed-site":
        # Why (issue: evaluation): phi* collapses ResNet-20 on Omniglot-100 once its strength
        # reaches 1, and its channel scale s is ~0 at the last block there (docs/evaluation.md).
        # The same runs wrapped without that site; compared with `datasets`' phi* and Base runs.
        # Then the remedy that needs no such knowledge: the scheduler switches phi off at a site
        # once its s closes (on_closed_site="exclude"), from scratch and when fine-tuning.
        phi_star: dict[str, Any] = {"phi": "default", "phi_name": "phi-star"}
        finetune = _finetune(steps)
        guarded: list[dict[str, Any]] = [{"on_closed_site": "exclude"}]
        guarded += [{"on_closed_site": "exclude", **finetune}] if finetune is not None else []
        for target in ("omniglot-100", "s-cifar10"):
            for method in [{"exclude": ["stages.2.2"]}, *guarded]:
                for seed in seeds:
                    runs.append(
                        TransferConfig(target=target, seed=seed, **phi_star, **method, **common)
                    )
        # phi* closes WRN-28-2's last block on s-CIFAR10 too (at step 200 of the architectures
        # grid's run, seed 0): the switch there, against that run (as published) and Base.
        # There the site reopened (s 0.35 at step 1,750); on Omniglot-100 it was still closed at
        # half strength. So the switch from half strength on, on both (exclude_closed_from).
        late: dict[str, Any] = {"on_closed_site": "exclude", "exclude_closed_from": 0.5}
        for seed in seeds:
            for switch in ({"on_closed_site": "exclude"}, late):
                runs.append(
                    TransferConfig(
                        target="s-cifar10",
                        model="cifar_wrn_28_2",
                        seed=seed,
                        **switch,
                        **phi_star,
                        **common,
                    )
                )
        for method in [late] + ([{**late, **finetune}] if finetune is not None else []):
            for seed in seeds:
                runs.append(
                    TransferConfig(target="omniglot-100", seed=seed, **phi_star, **method, **common)
                )
    elif name == "tune":
        for rate in DROPBLOCK_RATES:
            for size in DROPBLOCK_SIZES:
                runs.append(
                    TransferConfig(
                        target=_validation(),
                        dropblock_rate=rate,
                        dropblock_size=size,
                        steps=steps,
                    )
                )
        for alpha in MIXUP_ALPHAS:
            runs.append(TransferConfig(target=_validation(), mixup_alpha=alpha, steps=steps))
        # The control: whether a setting helps at all on this slice (a best rate at the grid's
        # edge that scores below Base would mean the regularizer is best switched off).
        runs.append(TransferConfig(target=_validation(), steps=steps))
    elif name == "pretrain":
        runs.append(_pretrain_config(steps))
    else:
        raise SystemExit(f"unknown grid {name!r}")
    return runs


def _tuned(steps: int) -> list[dict[str, Any]]:
    """DropBlock's and Mixup's settings with the best validation accuracy in the `tune` runs of
    this schedule; a grid's first value (with a note) while those runs are missing."""
    import json

    best: list[dict[str, Any]] = []
    for family in ("dropblock", "mixup"):
        scored = []
        for config in grid("tune", steps, [0]):
            path = RESULTS / f"{run_id(config)}.json"
            if config.method.startswith(family) and path.is_file():
                scored.append((json.loads(path.read_text())["accuracy"], config))
        if scored:
            config = max(scored, key=lambda item: item[0])[1]
        else:
            print(
                f"note: no `tune` results for {family} at {steps} steps: untuned", file=sys.stderr
            )
            config = next(c for c in grid("tune", steps, [0]) if c.method.startswith(family))
        if family == "dropblock":
            best.append(
                {"dropblock_rate": config.dropblock_rate, "dropblock_size": config.dropblock_size}
            )
        else:
            best.append({"mixup_alpha": config.mixup_alpha})
    return best


def _pretrain_config(steps: int) -> TransferConfig:
    """ResNet-20 trained on Tiny ImageNet-200 (train; validation as test): the fine-tuning source."""
    target = {"data": str(DATA / "tiny-imagenet-200-32px"), "test_split": "validation"}
    return TransferConfig(target=target, steps=steps, save_weights=True, curve_every=0)


def _pretrain_id(steps: int) -> str:
    return run_id(_pretrain_config(steps))


def _finetune(steps: int) -> dict[str, str] | None:
    """The settings that start a run from the `pretrain` network, or None (with a note) before
    that network exists."""
    pretrained = RESULTS / f"{_pretrain_id(steps)}.safetensors"
    if not pretrained.is_file():
        print(
            f"note: {pretrained.name} missing: run `pretrain` for the fine-tuning runs",
            file=sys.stderr,
        )
        return None
    return {"init": str(pretrained), "init_name": PRETRAINED}


def main() -> None:
    global DATA
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "grid",
        choices=[
            "priority",
            "architectures",
            "datasets",
            "tune",
            "pretrain",
            "placement",
            "annealing",
            "closed-site",
        ],
    )
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--shard", default="0/1", help="I/N: run every N-th pending run from I")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PATTERN",
        help="only runs whose id matches this shell pattern (repeatable), e.g. 'mnist-10k__*'",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument(
        "--flush-denormal",
        action="store_true",
        help=FLUSH_DENORMAL_HELP,
    )
    parser.add_argument(
        "--phi",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also evaluate this phi (a folder or .safetensors file), named NAME in the run ids",
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=1000, help="steps between checkpoints"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--list", action="store_true", help="print the runs and their state")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--data-root", type=Path, default=DATA, help="folder of the datasets (../shared/data)"
    )
    args = parser.parse_args()
    DATA = args.data_root.resolve()
    for entry in args.phi:
        name, sep, path = entry.partition("=")
        if not sep or not name or not Path(path).exists():
            parser.error(f"--phi {entry!r}: give NAME=PATH with an existing phi folder or file")
        EXTRA_PHI[name] = str(Path(path).resolve())
    try:
        set_up_cpu(args.threads, args.flush_denormal)
    except FlushDenormalError as error:
        parser.error(f"--flush-denormal: {error}")
    runs = grid(args.grid, args.steps, args.seeds)
    if args.only:
        runs = [run for run in runs if any(fnmatch(run_id(run), only) for only in args.only)]
        if not runs:
            parser.error(f"--only {args.only}: no run of the {args.grid} grid matches; see --list")
    # SIGTERM or Ctrl-C (how a sweep is stopped): the running run checkpoints the step it is at
    # and the sweep ends, its lock released; a second signal ends it at once.
    with stop_on_signals() as stop:
        try:
            sweep(runs, args, stop)
        except TrainingStoppedError as stopped:
            print(f"  {stopped}", flush=True)
            raise SystemExit(128 + signal.SIGTERM) from None


def run_state(config: TransferConfig, output_dir: Path, done: bool) -> str:
    """What ``--list`` says of a run: done, running (by whom), or pending, with the step its
    checkpoint holds if it has one (the runs that resume from where a session stopped, and how
    far a running one has saved)."""
    if done:
        return "done   "
    checkpoint = output_dir / f"{run_id(config)}.ckpt"
    saved = ""
    if checkpoint.is_file():
        step = int(torch.load(checkpoint, map_location="cpu", weights_only=True)["step"])
        saved = f"checkpoint at step {step:,}"
    holder = lock_holder(output_dir / f"{run_id(config)}.lock")
    if holder:
        return f"running ({holder}{', ' + saved if saved else ''})"
    return f"pending ({saved})" if saved else "pending"


def sweep(runs: list[TransferConfig], args: argparse.Namespace, stop: threading.Event) -> None:
    """Run (or list) this process's share of the pending runs, one after the other."""
    index, count = (int(part) for part in args.shard.split("/"))
    for position, config in enumerate(runs):
        config.device = args.device
        config.checkpoint_every = args.checkpoint_every
        done = (args.output_dir / f"{run_id(config)}.json").is_file() or (
            config.phi is not None and find_equivalent_result(config, args.output_dir) is not None
        )
        if args.list:
            print(f"{run_state(config, args.output_dir, done)} {run_id(config)}")
            continue
        if done or position % count != index:
            continue
        # Keep the trained network of every new run (a few MB, <run id>.safetensors), so that a
        # change to the evaluation can be measured on it without training it again. Set after
        # the check above: a result written without weights still answers its run.
        config.save_weights = True
        print(f"running {run_id(config)}", flush=True)
        try:
            result = run_transfer(config, args.output_dir, progress=sys.stderr.isatty(), stop=stop)
        except RunInProgressError as taken:  # another sweep has it: go on to the next run
            print(f"  skipped: {taken}", flush=True)
            continue
        print(f"  accuracy {result['accuracy']:.4f}, {result['train_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
