"""The ``metaperturb`` command: ``inspect`` a model's sites, ``convert`` the authors' phi."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from torch import nn

from .errors import MetaPerturbError

__all__ = ["build_model", "main"]


def build_model(name: str, num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """A model from its name: ``tv:resnet18`` for torchvision, anything else for timm."""
    if name.startswith("tv:"):
        import torchvision

        factory = getattr(torchvision.models, name[3:], None)
        if factory is None:
            raise SystemExit(f"error: torchvision.models has no {name[3:]!r}")
        model: nn.Module = factory(weights=None, num_classes=num_classes)
        return model
    import timm

    from . import models  # noqa: F401  (registers the project's own models with timm)

    if not timm.is_model(name):
        raise SystemExit(
            f"error: timm knows no model {name!r}; try `timm.list_models('*{name}*')`."
        )
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)


def _inspect(args: argparse.Namespace) -> int:
    from .wrapper import inspect

    model = build_model(args.model, in_chans=args.input_size[0])
    plan = inspect(
        model,
        sites=args.sites,
        input_size=args.input_size,
        placement=args.placement,
        exclude=args.exclude,
    )
    print(plan)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .convert import main as convert_main

    return convert_main([args.checkpoint, args.output])


def _train(args: argparse.Namespace) -> int:
    from .train.cli import run_from_args

    return run_from_args(args)


def _plot(args: argparse.Namespace) -> int:
    from .train.plot import plot_metrics

    try:
        print(plot_metrics(args.run_dir, args.output))
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _select(args: argparse.Namespace) -> int:
    from .train.cli import run_select

    return run_select(args)


def _eval(args: argparse.Namespace) -> int:
    from .transfer.cli import run_eval

    return run_eval(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metaperturb", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    inspect_parser = commands.add_parser(
        "inspect", help="print where wrap() puts phi in a timm or torchvision model"
    )
    inspect_parser.add_argument("model", help="a timm model name, or tv:NAME for torchvision")
    inspect_parser.add_argument(
        "--input-size",
        type=int,
        nargs=3,
        default=[3, 224, 224],
        metavar=("C", "H", "W"),
        help="planning input size (default: 3 224 224)",
    )
    inspect_parser.add_argument(
        "--sites",
        choices=["block", "stage"],
        default="block",
        help="a site after every block, or only at the end of each stage",
    )
    inspect_parser.add_argument(
        "--placement",
        choices=["output", "before_activation"],
        default="output",
        help="phi on each block's output, or before its final activation module",
    )
    inspect_parser.add_argument(
        "--exclude", nargs="+", default=[], metavar="SITE", help="sites to leave without phi"
    )
    inspect_parser.set_defaults(run=_inspect)

    convert_parser = commands.add_parser(
        "convert", help="convert the authors' perturb_750.pth (never redistribute the result)"
    )
    convert_parser.add_argument("checkpoint", help="the authors' .pth file")
    convert_parser.add_argument("output", help="folder to write")
    convert_parser.set_defaults(run=_convert)

    from .train.cli import DESCRIPTION, add_train_arguments

    train_parser = commands.add_parser(
        "train",
        help="meta-train phi on a labelled image dataset (also under torchrun)",
        description=DESCRIPTION.replace("-m metaperturb.train", "$(which metaperturb) train"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(train_parser).set_defaults(run=_train)

    plot_parser = commands.add_parser("plot", help="draw a meta-training metrics log to a PNG")
    plot_parser.add_argument(
        "run_dir", metavar="RUN", help="a run folder (from metaperturb train) or its metrics.jsonl"
    )
    plot_parser.add_argument("-o", "--output", help="PNG to write (default: RUN/metrics.png)")
    plot_parser.set_defaults(run=_plot)

    from .train.cli import add_select_arguments

    select_parser = commands.add_parser(
        "select",
        help="keep the best of several meta-trained phi by a short meta-test on validation data",
    )
    add_select_arguments(select_parser).set_defaults(run=_select)

    from .transfer.cli import add_eval_arguments

    eval_parser = commands.add_parser(
        "eval",
        help="train a target network with or without MetaPerturb (or another regularizer), "
        "test it and write the result",
    )
    add_eval_arguments(eval_parser).set_defaults(run=_eval)

    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except MetaPerturbError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
