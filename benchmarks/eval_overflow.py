"""Why a deep network's test predictions overflow under MetaPerturb, and what a clamp at test
time would change (README, the ResNet-44 paragraph below the architectures table).

phi's noise mean is linear in the features, so a site's output grows about as their square;
training clamps it at ``PerturbationConfig.clip`` (100), evaluation does not. This script takes
an evaluation run's checkpoint, scores the first N test images in the expectation and sample
modes as the library does and with the clamp applied at test time too, traces the largest site
output through the network for the first image that overflows, and tries ``update_bn`` both
ways. Writes ``benchmarks/results/eval-overflow.md``.

    git show f549c09:'benchmarks/results/transfer/s-cifar10__cifar_resnet44__metaperturb[phi-star]__10000steps__seed0.ckpt' > /tmp/r44.ckpt
    python benchmarks/eval_overflow.py /tmp/r44.ckpt --images 2000
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from metaperturb.evaluation import update_bn
from metaperturb.site import perturb
from metaperturb.transfer.config import TransferConfig
from metaperturb.transfer.run import UPDATE_BN_BATCHES, TransferRun
from metaperturb.wrapper import get_controller, set_eval_mode

RESULT = Path(__file__).parent / "results" / "eval-overflow.md"


def _restore(checkpoint: Path, scratch: Path) -> TransferRun:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    config = TransferConfig(**{**json.loads(state["config"]), "device": "cpu"})
    run = TransferRun(config, scratch)
    run.checkpoint_path.write_bytes(checkpoint.read_bytes())
    run.maybe_resume()
    return run


def _clamped(clip: float) -> Callable[..., torch.Tensor]:
    """The site function with the training clamp applied at test time too."""

    def site(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = perturb(*args, **kwargs)
        if kwargs["training"] or kwargs["eval_mode"] == "off":
            return out
        return out.clamp(max=clip)

    return site


def _score(run: TransferRun, rows: torch.Tensor) -> tuple[float, torch.Tensor]:
    torch.manual_seed(0)
    probabilities = run.predict(rows)
    finite = torch.isfinite(probabilities).all(dim=1)
    right = (probabilities.argmax(dim=1) == run.test_data.labels[rows]) & finite
    return 100 * right.float().mean().item(), finite


def _trace(run: TransferRun, row: int) -> list[tuple[str, float]]:
    """The largest |output| of every site for one test image, in order."""
    controller = get_controller(run.model)
    modules = dict(run.model.named_modules())
    largest: list[tuple[str, float]] = []
    hooks = [
        modules[name].register_forward_hook(
            lambda module, args, out, name=name: largest.append(
                (name, out.detach().float().abs().max().item())
            )
        )
        for name in controller.site_names
    ]
    try:
        run.predict(torch.tensor([row]))
    finally:
        for hook in hooks:
            hook.remove()
    return largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        run = _restore(args.checkpoint, Path(scratch))
        controller = get_controller(run.model)
        clip = float(controller.phi.config.clip or 100.0)
        rows = torch.arange(args.images)
        lines = [
            f"# Test-time overflow: {run.id}, step {run.step}, first {args.images} test images",
            "",
            f"Made by `python benchmarks/eval_overflow.py CHECKPOINT --images {args.images}`.",
            "",
            (
                "| mode | accuracy % (as is) | not finite | accuracy % (clamped at "
                f"{clip:g}) | not finite | predictions that moved |"
            ),
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        first_bad = None
        for mode in ("expectation", "sample"):
            set_eval_mode(run.model, mode)
            controller.site_function = perturb
            plain, plain_finite = _score(run, rows)
            if first_bad is None and not plain_finite.all():
                first_bad = int((~plain_finite).nonzero()[0])
            torch.manual_seed(0)
            reference = run.predict(rows)
            controller.site_function = _clamped(clip)
            clamped, clamped_finite = _score(run, rows)
            torch.manual_seed(0)
            both = plain_finite & clamped_finite
            moved = (run.predict(rows)[both].argmax(1) != reference[both].argmax(1)).sum()
            lines.append(
                f"| {mode} | {plain:.2f} | {int((~plain_finite).sum())} | {clamped:.2f} | "
                f"{int((~clamped_finite).sum())} | {int(moved)} of {int(both.sum())} |"
            )
        set_eval_mode(run.model, "expectation")
        controller.site_function = perturb
        trained = {k: v.clone() for k, v in run.model.state_dict().items()}
        batches = run.training_inputs(UPDATE_BN_BATCHES, run.config.steps)
        try:
            update_bn(batches, run.model)
            after = f"{_score(run, rows)[0]:.2f}"
        except FloatingPointError as error:
            after = f"refused ({error})"
        run.model.load_state_dict(trained)
        controller.site_function = _clamped(clip)
        update_bn(run.training_inputs(UPDATE_BN_BATCHES, run.config.steps), run.model)
        after_clamped, finite = _score(run, rows)
        lines += [
            "",
            (
                f"After `update_bn` ({UPDATE_BN_BATCHES} training batches): as is: {after}; "
                f"clamped: {after_clamped:.2f} ({int((~finite).sum())} not finite)."
            ),
        ]
        if first_bad is not None:
            run.model.load_state_dict(trained)
            controller.site_function = perturb
            trace = _trace(run, first_bad)
            lines += [
                "",
                f"Largest absolute site output for test image {first_bad} (expectation, as is):",
                "",
                "| site | largest absolute output |",
                "| --- | ---: |",
                *(f"| {name} | {value:.3g} |" for name, value in trace),
            ]
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
