"""``metaperturb train`` / ``python -m metaperturb.train``: one flag per :class:`TrainConfig` field.

The flags are generated from the dataclass, so ``--help`` always shows every setting with the
help text written next to the field and its default.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from ..errors import MetaPerturbError
from ..stopping import stop_on_signals
from .config import TrainConfig

__all__ = [
    "add_select_arguments",
    "add_train_arguments",
    "config_from_args",
    "main",
    "run_from_args",
    "run_select",
]

DESCRIPTION = """\
Meta-train phi, MetaPerturb's perturbation function, on a labelled image dataset (METHOD.md,
Algorithm 1). The classes are split into groups of two tasks; each task trains its own network,
all networks share phi, and phi learns from the tasks' held-out losses. Defaults are the
authors' recipe (10 tasks, ResNet-20, 750 steps, batch 128, Adam 1e-3 / 5e-4). The run folder
gets the config, the task split, a metrics log, a checkpoint and, at the end, phi/ (load it with
metaperturb.wrap(model, phi="RUN/phi")). Under torchrun the tasks are spread over the processes:
  torchrun --nproc-per-node 2 -m metaperturb.train --data DATA --output-dir RUN
"""

_TYPES: dict[str, type] = {"int": int, "float": float, "str": str}


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one ``--flag`` per :class:`TrainConfig` field to ``parser``."""
    for spec in fields(TrainConfig):
        flag = "--" + spec.name.replace("_", "-")
        annotation = str(spec.type).replace(" ", "")
        options: dict[str, Any] = {"dest": spec.name, "help": spec.metadata["help"]}
        if annotation in ("bool", "bool|None"):
            options["action"] = argparse.BooleanOptionalAction
        else:
            kind = annotation.split("|")[0]
            options["type"] = _TYPES[kind]
            if "choices" in spec.metadata:
                options["choices"] = spec.metadata["choices"]
            elif kind != "str":
                options["metavar"] = "N" if kind == "int" else "X"
            else:
                options["metavar"] = "DIR" if spec.name.endswith("_dir") else spec.name.upper()
        if spec.name == "data":
            options["required"] = True
        elif annotation == "bool":
            options["help"] += f" (default: {'yes' if spec.default else 'no'})"
        elif spec.default is not None:
            options["help"] += " (default: %(default)s)"
        options["default"] = spec.default
        parser.add_argument(flag, **options)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed arguments."""
    return TrainConfig(**{spec.name: getattr(args, spec.name) for spec in fields(TrainConfig)})


def run_from_args(args: argparse.Namespace) -> int:
    """Meta-train as ``args`` say; prints where phi went. Errors are one line on stderr."""
    from .loop import train

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank {rank}] %(message)s" if "RANK" in os.environ else "%(message)s",
    )
    try:
        config = config_from_args(args)
    except ValueError as error:  # TrainConfig's checks
        print(f"error: {error}", file=sys.stderr)
        return 2
    # torchrun, schedulers and Ctrl-C stop a run with a signal: the first one ends the step in
    # progress and checkpoints it (torchrun stops every rank this way when one fails; they stop
    # together, or on the broken connection); a second one ends the process at once.
    with stop_on_signals() as stop:
        try:
            target = train(config, stop=stop)
        except MetaPerturbError as error:
            print(f"error: {error}", file=sys.stderr)
            # 143 on every rank of a stop that was asked, even those that were not signalled.
            asked = stop.is_set() or getattr(error, "asked", False)
            return 128 + signal.SIGTERM if asked else 1
    if rank == 0:
        print(target)
    return 0


def add_select_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``metaperturb select`` (see :class:`~.selection.SelectConfig`)."""
    add = parser.add_argument
    add("candidates", nargs="+", metavar="PHI", help="phi folders, train run folders or Hub ids")
    add("--data", required=True, help="validation dataset, disjoint from your evaluation targets")
    add("--split", default="train", help="its split (default: train)")
    add("--image-size", type=int, default=32, metavar="N", help="resolution (default: 32)")
    add("--channels", type=int, default=3, metavar="N", help="3 (RGB) or 1 (default: 3)")
    add("--classes", type=int, metavar="N", help="keep the first N classes")
    add(
        "--max-per-class",
        type=int,
        required=True,
        metavar="N",
        help="use N images of each class: the first half trains, the second half tests",
    )
    add(
        "--skip-per-class",
        type=int,
        default=0,
        metavar="N",
        help="leave out the first N images of each class (an evaluation slice's)",
    )
    add("--model", default="cifar_resnet20", help="network trained with each phi (timm name)")
    add("--steps", type=int, default=1000, metavar="N", help="meta-test steps (default: 1000)")
    add("--batch-size", type=int, default=128, metavar="N", help="batch size (default: 128)")
    add("--lr", type=float, default=1e-3, metavar="X", help="Adam lr, x0.3 at 40/70/90%%")
    add("--weight-decay", type=float, default=5e-4, metavar="X", help="Adam weight decay")
    add("--seeds", type=int, default=1, metavar="N", help="repetitions averaged (default: 1)")
    add("--baseline", action="store_true", help="also score the network without phi")
    add("--output-dir", metavar="DIR", help="write selection.json and best/ (the winner) here")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add("--threads", type=int, metavar="N", help="torch CPU threads")
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    add("--seed", type=int, default=0, metavar="N", help="seed of the first meta-test")
    add(
        "--extra-task",
        dest="extra_tasks",
        action="append",
        nargs="+",
        type=_task_field,
        default=[],
        metavar="KEY=VALUE",
        help="another validation task, as the first task's fields that differ (data, split, "
        "classes, max_per_class, skip_per_class, image_size, channels, model), e.g. --extra-task "
        "data=../shared/data/omniglot split=background classes=100 max_per_class=20 channels=1, "
        "or --extra-task model=cifar_wrn_28_2 (a pre-activation host); repeat the flag for "
        "more. The score is the mean over the tasks",
    )
    add(
        "--screen-closed-sites",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pass over a candidate that closes a site at full strength when another does not",
    )
    return parser


def _task_field(text: str) -> tuple[str, str | int]:
    """``KEY=VALUE`` of ``--extra-task``; numbers as ints."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key = key.replace("-", "_")
    return key, int(value) if value.lstrip("-").isdigit() else value


def run_select(args: argparse.Namespace) -> int:
    """Score the candidates; print one line per candidate and the winner."""
    from .selection import SelectConfig, select

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = [action for action in vars(args) if action not in ("run", "command")]
    settings = {name: getattr(args, name) for name in names}
    settings["extra_tasks"] = [dict(fields) for fields in settings["extra_tasks"]]
    try:
        report = select(SelectConfig(**settings))
    except (MetaPerturbError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for name, score in sorted(report["scores"].items(), key=lambda item: -item[1]):
        print(f"{score:.4f}  {name}")
    if report["baseline"] is not None:
        print(f"{report['baseline']:.4f}  (no phi)")
    for name, sites in report["closed_sites"].items():
        print(f"closed at full strength: {name}: {sites}")
    print(f"best: {report['best']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m metaperturb.train",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(parser)
    return run_from_args(parser.parse_args(argv))
