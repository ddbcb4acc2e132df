"""What the clamp at test time changes on trained networks (README: the ResNet-44 paragraph
below the architectures table, and "Choices that differ from the authors' code").

phi's noise mean is linear in the features, so a site's output grows about as their square.
Training clamps it at ``PerturbationConfig.clip`` (100); the authors do not clamp at test time,
and until ``clip_in_eval`` (on by default) neither did this library. For each evaluation run's
checkpoint, this script scores N test images (evenly spaced) in the expectation and sample modes
without the clamp (the authors' evaluation) and with it, counts the images on which some site's
output passes the clamp when nothing stops it, tries ``update_bn`` both ways, and traces the
largest site output through the network for the first image whose prediction overflows. Writes
``benchmarks/results/eval-overflow.md``.

It takes checkpoints (``.ckpt``) and the weights of finished runs that kept them
(``<run id>.safetensors``, beside the run's result). The runs made before the sweeps kept weights
left only the checkpoints of runs stopped part-way and committed (benchmarks/save_runs.sh):
``--from-git`` takes the latest committed checkpoint of every MetaPerturb run in the history of
``benchmarks/results/transfer`` whose id matches the pattern.

    python benchmarks/eval_overflow.py --from-git '*metaperturb*' --images 10000
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from metaperturb.evaluation import update_bn
from metaperturb.transfer.config import TransferConfig
from metaperturb.transfer.run import UPDATE_BN_BATCHES, TransferRun
from metaperturb.wrapper import get_controller, set_eval_mode

ROOT = Path(__file__).parent
RESULT = ROOT / "results" / "eval-overflow.md"
RUNS = "benchmarks/results/transfer"


def committed_checkpoints(pattern: str, scratch: Path) -> list[Path]:
    """The latest committed version of every checkpoint in ``RUNS``'s history whose run id
    matches ``pattern``, copied into ``scratch``; newest commit first."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT.parent, capture_output=True, text=True, check=True
        ).stdout

    listed = git("log", "--all", "--format=", "--name-only", "--", f"{RUNS}/*.ckpt")
    names = dict.fromkeys(listed.splitlines())
    found = []
    for name in filter(None, names):
        if not fnmatch.fnmatchcase(Path(name).stem, pattern):
            continue
        commit = git("log", "--all", "-1", "--format=%H", "--diff-filter=AM", "--", name).strip()
        blob = subprocess.run(
            ["git", "show", f"{commit}:{name}"], cwd=ROOT.parent, capture_output=True, check=True
        ).stdout
        path = scratch / Path(name).name
        path.write_bytes(blob)
        found.append(path)
    return found


def restore(path: Path, scratch: Path) -> TransferRun:
    """The network of a run's checkpoint (``.ckpt``), or of a finished run that kept its weights
    (``<run id>.safetensors``, with its ``<run id>.json`` beside it)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        result = json.loads(path.with_suffix(".json").read_text())
        run = TransferRun(TransferConfig(**{**result["config"], "device": "cpu"}), scratch)
        run.model.load_state_dict(load_file(path))
        run.step = run.config.steps
        return run
    state = torch.load(path, map_location="cpu", weights_only=True)
    config = TransferConfig(**{**json.loads(state["config"]), "device": "cpu"})
    run = TransferRun(config, scratch)
    run.checkpoint_path.write_bytes(path.read_bytes())
    run.maybe_resume()
    return run


@dataclass
class Scores:
    """One evaluation of N test images."""

    probabilities: torch.Tensor
    accuracy: float
    finite: torch.Tensor
    #: Per image, the largest output of any site (recorded when asked).
    largest: torch.Tensor | None = None

    @property
    def nonfinite(self) -> int:
        return int((~self.finite).sum())

    def cell(self) -> str:
        return f"{self.accuracy:.2f}" + (f" ({self.nonfinite} nf)" if self.nonfinite else "")


@contextlib.contextmanager
def site_outputs(
    run: TransferRun, reduce: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Per site, in order, ``reduce`` of each forward's output (flattened per image)."""
    modules = dict(run.model.named_modules())
    outputs: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name in get_controller(run.model).site_names:
        outputs[name] = []
        hooks.append(
            modules[name].register_forward_hook(
                lambda module, args, out, name=name: outputs[name].append(
                    reduce(out.detach().float().flatten(1))
                )
            )
        )
    try:
        yield outputs
    finally:
        for hook in hooks:
            hook.remove()


def score(run: TransferRun, rows: torch.Tensor, record: bool = False) -> Scores:
    """Accuracy of ``rows`` in the current mode (seeded, so samples repeat); ``record`` also
    keeps each image's largest site output (NaN counted as past any clamp)."""
    empty: dict[str, list[torch.Tensor]] = {}
    recording = site_outputs(run, lambda out: out.max(dim=1).values)
    with recording if record else contextlib.nullcontext(empty) as outputs:
        torch.manual_seed(0)
        probabilities = run.predict(rows)
    largest = None
    if record:
        per_site = torch.stack([torch.cat(values) for values in outputs.values()])
        largest = per_site.nan_to_num(nan=float("inf")).max(dim=0).values
    finite = torch.isfinite(probabilities).all(dim=1)
    right = (probabilities.argmax(dim=1) == run.test_data.labels[rows]) & finite
    return Scores(probabilities, 100 * right.float().mean().item(), finite, largest)


def moved(a: Scores, b: Scores) -> str:
    both = a.finite & b.finite
    changed = (a.probabilities[both].argmax(1) != b.probabilities[both].argmax(1)).sum()
    return f"{int(changed)} of {int(both.sum())}"


def trace(run: TransferRun, row: int) -> list[tuple[str, float]]:
    """The largest |output| of every site for one test image, in order."""
    with site_outputs(run, lambda out: out.abs().max(dim=1).values) as outputs:
        run.predict(torch.tensor([row]))
    return [(name, values[0].item()) for name, values in outputs.items()]


def after_update_bn(run: TransferRun, rows: torch.Tensor) -> str:
    trained = {k: v.clone() for k, v in run.model.state_dict().items()}
    try:
        update_bn(run.training_inputs(UPDATE_BN_BATCHES, run.config.steps), run.model)
        return score(run, rows).cell()
    except FloatingPointError:
        return "refused (not finite)"
    finally:
        run.model.load_state_dict(trained)


def examine(checkpoint: Path, images: int) -> tuple[str, list[str]]:
    """One table row for ``checkpoint``, and the trace of its first overflowing image."""
    with tempfile.TemporaryDirectory() as scratch:
        run = restore(checkpoint, Path(scratch))
        config = get_controller(run.model).phi.config
        clip = config.clip
        assert clip is not None, "these runs were trained with the clamp"
        # Evenly spaced, as the training curve's: the test sets are sorted by class, so the
        # first N images would be the first few classes only.
        count = min(images, len(run.test_data))
        rows = torch.linspace(0, len(run.test_data) - 1, count).round().long()
        cells: dict[tuple[str, bool], Scores] = {}
        bn: dict[bool, str] = {}
        for clamped in (False, True):
            config.clip_in_eval = clamped
            for mode in ("expectation", "sample"):
                set_eval_mode(run.model, mode)
                record = mode == "expectation" and not clamped
                cells[mode, clamped] = score(run, rows, record=record)
            set_eval_mode(run.model, "expectation")
            bn[clamped] = after_update_bn(run, rows)
        largest = cells["expectation", False].largest
        assert largest is not None
        passing = int((largest > clip).sum())
        row = (
            f"| {run.id} | {run.step} | {len(rows)} | {passing} | "
            + " | ".join(
                f"{cells[mode, False].cell()} | {cells[mode, True].cell()} | "
                f"{moved(cells[mode, False], cells[mode, True])}"
                for mode in ("expectation", "sample")
            )
            + f" | {bn[False]} | {bn[True]} |"
        )
        details: list[str] = []
        bad = (~cells["expectation", False].finite).nonzero()
        if len(bad):
            config.clip_in_eval = False
            first = int(rows[bad[0]])  # the test image, not its position among the rows
            details = [
                (
                    f"Largest absolute site output of {run.id} (step {run.step}) for test image "
                    f"{first}, expectation, no clamp:"
                ),
                "",
                "| site | largest absolute output |",
                "| --- | ---: |",
                *(f"| {name} | {value:.3g} |" for name, value in trace(run, first)),
            ]
        return row, details


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", type=Path, nargs="*")
    parser.add_argument(
        "--from-git", metavar="PATTERN", help="committed checkpoints whose run id matches"
    )
    parser.add_argument("--images", type=int, default=10000, help="N test images, evenly spaced")
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        checkpoints = list(args.checkpoints)
        if args.from_git:
            checkpoints += committed_checkpoints(args.from_git, Path(scratch))
        if not checkpoints:
            parser.error("no checkpoints: name some, or match committed ones with --from-git")
        command = "python benchmarks/eval_overflow.py" + (
            f" --from-git '{args.from_git}'" if args.from_git else " CHECKPOINT ..."
        )
        lines = [
            "# The clamp at test time, on trained networks",
            "",
            (
                f"Made by `{command} --images {args.images}`. Each row is a checkpoint of an "
                "evaluation run stopped part-way (its step), scored on N test images, evenly spaced, "
                "without the clamp (the authors' evaluation, `clip_in_eval=False`) and with it "
                "(the library's default). *Passing*: test images on which some site's output "
                "exceeds the clamp when nothing stops it (expectation mode). *nf*: predictions "
                "that are NaN or infinite (counted wrong). *Moved*: predictions that differ, of "
                "those finite both ways."
            ),
            "",
            (
                "| run | step | images | passing | expectation, no clamp | expectation, clamp | "
                "moved | sample, no clamp | sample, clamp | moved | update_bn, no clamp | "
                "update_bn, clamp |"
            ),
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        traces: list[str] = []
        for checkpoint in checkpoints:
            row, details = examine(checkpoint, args.images)
            print(row, flush=True)
            lines.append(row)
            if details and not traces:
                traces = ["", *details]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines + traces) + "\n")
    print("\n".join(lines + traces))


if __name__ == "__main__":
    main()
