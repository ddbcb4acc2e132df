"""``metaperturb eval``: train one target network with one method and record the result."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from .._machine import FLUSH_DENORMAL_HELP, set_up_cpu
from ..stopping import stop_on_signals
from .run import TransferConfig, run_id, run_transfer
from .targets import PRESETS

__all__ = ["add_eval_arguments", "config_from_args", "run_eval"]


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``metaperturb eval`` (see :class:`~.run.TransferConfig`)."""
    add = parser.add_argument
    add("--target", help=f"a preset: {', '.join(PRESETS)} (with --data-root), or use --data")
    add("--data-root", default="../shared/data", help="folder of the presets' datasets")
    add("--data", help="any dataset load_images reads (instead of --target)")
    add("--split", default="train", help="--data: training split")
    add("--test-split", default="test", help="--data: test split (may equal --split)")
    add("--classes", type=int, metavar="N", help="--data: keep the first N classes")
    add("--per-class", type=int, metavar="N", help="--data: training images per class")
    add("--skip-per-class", type=int, default=0, metavar="N", help="--data: skip first N")
    add("--test-per-class", type=int, metavar="N", help="--data: test images per class")
    add("--test-skip-per-class", type=int, default=0, metavar="N", help="--data: skip first N")
    add("--size", type=int, default=32, metavar="N", help="--data: image side in pixels")
    add("--channels", type=int, default=3, metavar="N", help="--data: 3 (RGB) or 1")
    add("--model", default="cifar_resnet20", help="timm name of the network")
    add("--phi", help='MetaPerturb with this phi: "default" (phi*), a folder, file or Hub id')
    add("--phi-name", help="label of --phi in the run id")
    add("--dropblock-rate", type=float, default=0.0, metavar="X", help="DropBlock (0: off)")
    add("--dropblock-size", type=int, default=3, metavar="N", help="DropBlock block size")
    add("--mixup-alpha", type=float, default=0.0, metavar="X", help="Manifold Mixup (0: off)")
    add("--init", help="start from these weights (fine-tuning): .safetensors or torch file")
    add("--init-name", help="label of --init in the run id")
    add("--steps", type=int, default=10_000, metavar="N", help="training steps (default 10000)")
    add("--batch-size", type=int, default=128, metavar="N")
    add("--lr", type=float, default=1e-3, metavar="X", help="Adam lr, x0.3 at 40/70/90%%")
    add("--weight-decay", type=float, default=5e-4, metavar="X")
    add("--seed", type=int, default=0, metavar="N")
    add("--curve-every", type=int, default=1000, metavar="N", help="test accuracy every N steps")
    add("--curve-images", type=int, default=2000, metavar="N", help="test images for the curve")
    add("--mc", type=int, nargs="*", default=[], metavar="K", help="also MC-K evaluations")
    add("--checkpoint-every", type=int, default=1000, metavar="N")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add(
        "--placement",
        choices=("output", "before_activation"),
        default="output",
        help="what phi perturbs: block outputs, or the input of each block's final activation "
        "(explicit here, whatever phi's config says, so that run ids name it)",
    )
    add(
        "--ramp-fraction",
        type=float,
        default=0.4,
        metavar="X",
        help="phi's strength ramps from 0 to 1 over this fraction of the steps (default 0.4)",
    )
    add(
        "--exclude",
        nargs="+",
        default=[],
        metavar="SITE",
        help="leave these sites without phi (names as `metaperturb inspect` lists them), e.g. "
        "one that a ClosedSiteWarning names",
    )
    add(
        "--on-closed-site",
        choices=["warn", "exclude"],
        default="warn",
        help="what the strength scheduler does about a site whose channel scale closes during "
        "training: warn (default here: the method as published, as the README's runs did), or "
        "switch phi off there, the library's default (run id: exclude-closed)",
    )
    add(
        "--exclude-closed-from",
        type=float,
        default=0.0,
        metavar="STRENGTH",
        help="with --on-closed-site exclude: switch a closed site off only from this strength "
        "on (0-1; before it a closed site is recorded, and one that reopens stays on; run id: "
        "exclude-closed-fromSTRENGTH). Default: 0, the first check that finds it",
    )
    add("--threads", type=int, metavar="N", help="torch CPU threads")
    add(
        "--flush-denormal",
        action="store_true",
        help=FLUSH_DENORMAL_HELP,
    )
    add(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="network and batches in channels_last (default: on a CPU only, where it is faster)",
    )
    add(
        "--save-weights",
        action="store_true",
        help="also keep the trained network (<run id>.safetensors), to score it again later",
    )
    add("--output-dir", default="eval-results", help="where <run id>.json goes")
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> TransferConfig:
    if (args.target is None) == (args.data is None):
        raise ValueError("give exactly one of --target (a preset) and --data.")
    target: str | dict[str, Any]
    if args.target is not None:
        target = args.target
    else:
        target = {
            "data": args.data,
            "split": args.split,
            "classes": args.classes,
            "per_class": args.per_class,
            "skip_per_class": args.skip_per_class,
            "test_split": args.test_split,
            "test_per_class": args.test_per_class,
            "test_skip_per_class": args.test_skip_per_class,
            "image_size": args.size,
            "channels": args.channels,
        }
    return TransferConfig(
        target=target,
        data_root=args.data_root if args.target is not None else None,
        model=args.model,
        phi=args.phi,
        phi_name=args.phi_name,
        placement=args.placement,
        ramp_fraction=args.ramp_fraction,
        exclude=list(args.exclude),
        on_closed_site=args.on_closed_site,
        exclude_closed_from=args.exclude_closed_from,
        dropblock_rate=args.dropblock_rate,
        dropblock_size=args.dropblock_size,
        mixup_alpha=args.mixup_alpha,
        init=args.init,
        init_name=args.init_name,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        curve_every=args.curve_every,
        curve_images=args.curve_images,
        mc_samples=list(args.mc),
        checkpoint_every=args.checkpoint_every,
        device=args.device,
        channels_last=args.channels_last,
        save_weights=args.save_weights,
    )


def run_eval(args: argparse.Namespace) -> int:
    """Run (or read back) one evaluation and print its headline numbers."""
    from ..errors import MetaPerturbError

    try:
        set_up_cpu(args.threads, args.flush_denormal)
        config = config_from_args(args)
        with stop_on_signals() as stop:  # Ctrl-C / SIGTERM: checkpoint this step, then stop
            result = run_transfer(config, args.output_dir, progress=args.progress, stop=stop)
    except (MetaPerturbError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        # A stop that was asked (SIGTERM, Ctrl-C) exits as a signalled process would.
        return 128 + signal.SIGTERM if getattr(error, "asked", False) else 1
    summary = {
        "id": run_id(config),
        "accuracy": round(result["accuracy"], 4),
        "ece": round(result["ece"], 4),
        "train_seconds": round(result["train_seconds"], 1),
    }
    for mode, scores in result["evaluation"].items():
        if mode != "default":
            summary[f"accuracy_{mode}"] = round(scores["accuracy"], 4)
    print(json.dumps(summary))
    return 0
