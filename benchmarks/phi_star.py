"""Make phi*, the phi that ships with the package: meta-train, select, install.

Three steps, each resumable and safe to rerun (a finished step is skipped):

    python benchmarks/phi_star.py train --runs 5      # metaperturb train, seeds 0..4
    python benchmarks/phi_star.py train --seeds 1 --threads 1 &   # or one process per seed
    python benchmarks/phi_star.py train --seeds 0 --placement before_activation  # the authors'
                                                      # placement: runs/phi-star/preact-seed-0
    python benchmarks/phi_star.py select              # metaperturb select on a CIFAR-10 slice
                                                      # and 100 Omniglot background classes
    python benchmarks/phi_star.py install             # winner -> weights/phi-star/
    python benchmarks/phi_star.py status              # progress of every run

``train`` runs the paper's recipe (10 class-wise tasks of Tiny ImageNet-200 at 32px, ResNet-20,
750 steps, batch 128) once per seed into ``runs/phi-star/seed-<k>/`` with ``--resume``, so a
stopped run continues from its last checkpoint. ``select`` scores every finished run by a
full-schedule meta-test on CIFAR-10 train images 500-999 of each class, which no evaluation in
this repo uses (the evaluation's s-CIFAR10 takes the first 500 of each class, and its test
split), and one on 100 classes of Omniglot's background split (the evaluation's Omniglot-100 is
in its evaluation split), passing over a run that closes a site at full strength. ``install``
copies the winner into ``weights/phi-star/`` with a model card holding the recipe, the selection
scores, a summary of the metrics log and a plot of phi's scales per site.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Literal

import torch

from metaperturb._atomic import atomic_write
from metaperturb.diagnostics import CLOSED_BELOW

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "phi-star"
TARGET = ROOT / "weights" / "phi-star"
SOURCE = ROOT.parent / "shared" / "data" / "tiny-imagenet-200-32px"
VALIDATION = ROOT.parent / "shared" / "data" / "cifar10"
#: The many-class validation task beside CIFAR-10: 100 Omniglot *background* alphabets' classes
#: (the evaluation's Omniglot-100 uses the disjoint evaluation split), 10 train / 10 test each.
#: phi* passed the CIFAR-10 meta-test and then collapsed ResNet-20 on Omniglot-100
#: (docs/evaluation.md).
MANY_CLASS = ROOT.parent / "shared" / "data" / "omniglot"
#: The pre-activation host meta-tested beside ResNet-20 on the CIFAR-10 slice: its blocks hand
#: phi the signed residual stream, which grows block by block, and phi* closed its last block on
#: s-CIFAR10 early in the ramp where it leaves ResNet-20's open (it reopened by step 1,750, but
#: the screen at full strength is there for a phi that does not; docs/evaluation.md).
PRE_ACTIVATION_MODEL = "cifar_wrn_28_2"
AUTHORS_PHI = ROOT / "runs" / "authors-phi"  # converted by benchmarks/transfer.py, never shipped
#: What outlives ``runs/`` (ignored, so lost when a session starts from a fresh checkout): each
#: finished run's phi, metrics log and settings, and the selection report (a few hundred kB).
KEPT = ROOT / "benchmarks" / "results" / "phi-star"


def _finished(run: Path) -> bool:
    return (run / "phi" / "model.safetensors").is_file()


def _run_name(seed: int, placement: str) -> str:
    """A run's folder name: ``seed-<k>``, or ``preact-seed-<k>`` for ``before_activation``."""
    return f"{'preact-' if placement == 'before_activation' else ''}seed-{seed}"


def _parse_run_name(name: str) -> tuple[int, str] | None:
    """The seed and placement a run folder's name stands for (the inverse of ``_run_name``)."""
    match = re.fullmatch(r"(preact-)?seed-(\d+)", name)
    if match is None:
        return None
    return int(match[2]), "before_activation" if match[1] else "output"


def _runs(runs_dir: Path) -> list[Path]:
    """Every run folder: ``seed-<k>`` (phi on block outputs) and ``preact-seed-<k>`` (phi
    before the blocks' last ReLU, ``--placement before_activation``)."""
    return sorted(p for p in runs_dir.glob("*seed-*") if p.is_dir() and p.name != "selection")


def train(args: argparse.Namespace) -> None:
    seeds = args.seeds if args.seeds is not None else list(range(args.runs))
    for seed in seeds:
        run = args.runs_dir / _run_name(seed, args.placement)
        if _finished(run):
            print(f"{run.name}: finished, skipped")
            continue
        command = [
            sys.executable, "-m", "metaperturb.train",
            "--data", str(args.data), "--output-dir", str(run), "--seed", str(seed),
            "--steps", str(args.steps), "--checkpoint-every", "25", "--no-progress",
            "--placement", args.placement,
        ]  # fmt: skip
        if (run / "checkpoint.pt").is_file():
            command.append("--resume")
        if args.threads:
            command += ["--threads", str(args.threads)]
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)


def select(args: argparse.Namespace) -> None:
    runs = [str(run) for run in _runs(args.runs_dir) if _finished(run)]
    if not runs:
        raise SystemExit(f"no finished run under {args.runs_dir}: run `train` first.")
    # The phi* now installed competes too (unless one of the runs is it): a new run replaces
    # it only by scoring higher in the same meta-test, not by being the best of a new batch.
    installed = _installed_candidate(runs)
    if installed is not None:
        runs.append(installed)
    command = [
        sys.executable, "-m", "metaperturb", "select", *runs,
        "--data", str(args.data), "--skip-per-class", "500", "--max-per-class", "500",
        "--steps", str(args.steps), "--seeds", str(args.seeds), "--baseline",
        "--output-dir", str(args.runs_dir / "selection"), "--no-progress",
    ]  # fmt: skip
    if args.many_class:
        command += ["--extra-task", f"data={MANY_CLASS}", "split=background", "classes=100"]
        command += ["max_per_class=20", "skip_per_class=0", "channels=1"]
    if args.pre_activation_task:
        command += ["--extra-task", f"model={PRE_ACTIVATION_MODEL}"]
    if not args.screen_closed_sites:
        command.append("--no-screen-closed-sites")
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    if args.runs_dir == RUNS:
        keep_finished(RUNS, KEPT)


def _installed_candidate(runs: list[str]) -> str | None:
    """``weights/phi-star`` as a candidate, or None if absent or the same 82 numbers as a run."""
    from metaperturb.hub import load_phi

    if not (TARGET / "model.safetensors").is_file():
        return None
    fingerprint = load_phi(TARGET).fingerprint()
    for run in runs:
        if load_phi(Path(run) / "phi").fingerprint() == fingerprint:
            return None
    return str(TARGET)


def _metrics_summary(run: Path) -> list[str]:
    from metaperturb.train.metrics import read_metrics

    records = read_metrics(run / "metrics.jsonl")
    first, last = records[0], records[-1]
    lines = ["| step | " + " | ".join(k.replace("_", " ") for k in last["mean"]) + " |"]
    lines.append("| ---: |" + " ---: |" * len(last["mean"]))
    chosen = {id(r): r for r in (first, records[len(records) // 2], last)}.values()
    for record in chosen:
        values = " | ".join(f"{record['mean'][k]:.3f}" for k in last["mean"])
        lines.append(f"| {record['step']} | {values} |")
    return lines


def reproduce_commands(report: dict) -> list[str]:
    """The commands that made this selection, as the report recorded it: the seeds each
    placement was meta-trained with and ``select``'s own settings, not today's defaults (phi*'s
    first selection, 2,000 steps on CIFAR-10 alone, is not what a bare ``select`` runs now)."""
    seeds: dict[str, list[int]] = {"output": [], "before_activation": []}
    for name in report["scores"]:
        parsed = _parse_run_name(Path(name).name)
        if parsed is not None:
            seeds[parsed[1]].append(parsed[0])
    script = "python benchmarks/phi_star.py"
    lines = [
        f"{script} train --seeds {' '.join(str(s) for s in sorted(chosen))}"
        + ("" if placement == "output" else f" --placement {placement}")
        for placement, chosen in seeds.items()
        if chosen
    ]
    config = report["config"]
    select = f"{script} select --steps {config['steps']}"
    if config.get("seeds", 1) != 1:
        select += f" --seeds {config['seeds']}"
    models = [task.get("model", "cifar_resnet20") for task in report.get("tasks", [])]
    if sum(model != PRE_ACTIVATION_MODEL for model in models) < 2:
        select += " --no-many-class"
    if PRE_ACTIVATION_MODEL not in models:
        select += " --no-pre-activation-task"
    if not config.get("screen_closed_sites", False):
        select += " --no-screen-closed-sites"
    return [*lines, select, f"{script} install"]


def _selection_sentence(report: dict) -> str:
    validation, config = report["validation"], report["config"]
    target = validation["target"]
    first = target["skip_per_class"]
    last = target["test_skip_per_class"] + target["test_per_class"] - 1
    return (
        f"Each candidate scored by a {config['steps']}-step meta-test of `{config['model']}` on "
        f"`{validation['data']}` (images {first}-{last} of each class: the first "
        f"{target['per_class']} of each class train, the next {target['test_per_class']} test; "
        f"{validation['train']} train / {validation['test']} test images), accuracy averaged "
        f"over {config['seeds']} seed(s)"
    ) + _more_tasks_sentence(report)


def _more_tasks_sentence(report: dict) -> str:
    """The extra validation tasks and the closed-site screen (selections since 2026-12-06)."""
    extra = report.get("tasks", [])[1:]
    described = "; ".join(
        f"`{task['data']}` ({task['target']['classes'] or 'all'} classes, "
        f"{task['train']} train / {task['test']} test images)"
        for task in extra
    )
    sentence = f", and on {described}; the score is the mean over the tasks" if extra else ""
    closed = report.get("closed_sites", {})
    if report.get("config", {}).get("screen_closed_sites"):
        sentence += (
            ". A candidate whose meta-test closed a site at full strength (s < "
            f"{CLOSED_BELOW} at the end of the ramp) is passed over for one that closed none"
        )
        if closed:
            listed = "; ".join(f"`{Path(n).name}`: {sites}" for n, sites in closed.items())
            sentence += f" ({listed})"
    return sentence + "; the highest ships."


BUNDLED_NOTE = (
    "This is phi*, the phi bundled with the `metaperturb` package: `metaperturb.wrap(model)` "
    "loads it from the installed package, offline, with no `phi=`. It is not on the Hub; "
    '`huggingface_hub.HfApi().upload_folder(repo_id="<org>/phi-star", '
    "folder_path=metaperturb.hub.default_phi_path())` would publish this folder as it is, "
    "card and plot included."
)


def install(args: argparse.Namespace) -> None:
    from metaperturb import Perturbation
    from metaperturb.train.plot import plot_metrics

    report = json.loads((args.runs_dir / "selection" / "selection.json").read_text())
    best = Path(report["best"])
    if best.resolve() == Path(args.target_dir).resolve():
        score = report["scores"][report["best"]]
        print(f"the installed phi* scored highest ({score:.4f}): it stays, nothing installed")
        return
    phi = Perturbation.from_pretrained(best / "phi" if (best / "phi").is_dir() else best)
    run = best if (best / "metrics.jsonl").is_file() else best.parent
    score = report["scores"][report["best"]]
    metadata = dict(phi.config.metadata)
    metadata["selection_score"] = f"{score:.4f}"
    metadata["selection_data"] = ", ".join(
        [task["data"] for task in report.get("tasks", [])] or [report["validation"]["data"]]
    )
    phi.config = dataclasses.replace(phi.config, metadata=metadata)
    scores = [f"| `{Path(n).name}` | {s:.4f} |" for n, s in sorted(report["scores"].items())]
    baseline = report.get("baseline")
    if baseline is not None:
        scores.append(f"| no phi (baseline) | {baseline:.4f} |")
    recipe = (run / "phi" / "README.md").read_text().split("## Provenance", 1)[1]
    recipe = recipe.split("## Citation", 1)[0].split("\n\n", 2)[-1].strip()
    provenance = "\n".join(
        [
            BUNDLED_NOTE,
            "",
            recipe,
            "",
            "### Reproduce",
            "",
            "```bash",
            *reproduce_commands(report),
            "```",
            "",
            "### Selection",
            "",
            _selection_sentence(report),
            "",
            "| candidate | validation accuracy |",
            "| --- | ---: |",
            *scores,
            "",
            "### Every candidate (wall time on the machine that ran it)",
            "",
            *_status_lines(args.runs_dir, finished_only=True),
            "",
            f"### Meta-training log (`{run.name}`, mean over tasks)",
            "",
            *_metrics_summary(run),
            "",
            "![phi's scale per site during meta-training](metrics.png)",
        ]
    )
    phi.save_pretrained(args.target_dir, provenance=provenance, license="mit")
    plot_metrics(run, args.target_dir / "metrics.png")
    print(f"phi* installed in {args.target_dir} from {run.name} (validation accuracy {score:.4f})")


def status(args: argparse.Namespace) -> None:
    """One line per run: progress, wall time, last metrics, divergence, and a table of phi's
    weight magnitudes; also written to ``benchmarks/results/phi-star-runs.md``, and every
    finished run's small files kept in ``benchmarks/results/phi-star/`` (commit both)."""
    text = "\n".join(_status_lines(args.runs_dir)) + "\n"
    report = ROOT / "benchmarks" / "results" / "phi-star-runs.md"
    atomic_write(report if args.runs_dir == RUNS else args.runs_dir / "status.md", text)
    print(text, end="")
    if args.runs_dir == RUNS:
        for kept in keep_finished(RUNS, KEPT):
            print(f"kept {kept.relative_to(ROOT)}")


def keep_finished(runs_dir: Path, kept_dir: Path) -> list[Path]:
    """Copy what a finished run is worth keeping (its phi, metrics log and settings; the
    selection report) from ``runs_dir`` to ``kept_dir``, which is committed; the 35 MB
    checkpoints stay behind. Returns the files written."""

    wanted = [
        (run / name, kept_dir / run.name / name)
        for run in _runs(runs_dir)
        if _finished(run)
        for name in ("phi", "metrics.jsonl", "train_config.json")
    ]
    wanted.append(
        (runs_dir / "selection" / "selection.json", kept_dir / "selection" / "selection.json")
    )
    written = []
    for source, target in wanted:
        files = sorted(source.glob("*")) if source.is_dir() else [source]
        for file in files:
            destination = target / file.name if source.is_dir() else target
            if file.is_file() and (
                not destination.is_file() or destination.read_bytes() != file.read_bytes()
            ):
                atomic_write(destination, file.read_bytes())
                written.append(destination)
    return written


def _status_lines(runs_dir: Path, finished_only: bool = False) -> list[str]:
    import math

    from metaperturb.train.metrics import read_metrics

    lines = [
        "| run | steps done | wall time (h) | steps/s | train acc | held-out acc | held-out loss | state |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for run in _runs(runs_dir):
        if finished_only and not _finished(run):
            continue
        log = run / "metrics.jsonl"
        records = read_metrics(log) if log.is_file() else []
        if not records:
            lines.append(f"| {run.name} | 0 | | | | | | started |")
            continue
        total = json.loads((run / "train_config.json").read_text()).get("steps", "?")
        last = records[-1]
        mean = last["mean"]
        diverged = any(not math.isfinite(v) for r in records for v in r["mean"].values())
        state = "diverged" if diverged else ("finished" if _finished(run) else "running/stopped")
        lines.append(
            f"| {run.name} | {last['step']} / {total} | {last['elapsed_s'] / 3600:.2f} | "
            f"{last['steps_per_s']:.3f} | {mean['train_acc']:.3f} | {mean['heldout_acc']:.3f} | "
            f"{mean['heldout_loss']:.3f} | {state} |"
        )
    return lines + ["", *_magnitude_lines(runs_dir, finished_only)]


def _phi_state(run: Path) -> tuple[str, dict[str, torch.Tensor], dict | None] | None:
    """A run's phi from its latest checkpoint (with phi's Adam state), else its final phi."""
    from metaperturb.hub import load_phi

    checkpoint = run / "checkpoint.pt"
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        return f"step {state['step']}", state["phi"], state["phi_optimizer"]
    if _finished(run):
        return "final", load_phi(run / "phi").state_dict(), None
    return None


def _signal_over_decay(
    weights: dict[str, torch.Tensor], optimizer: dict, decay: float
) -> list[str]:
    """Per tensor, |Adam's first moment| / (weight decay x |w|). Adam's first moment averages the
    gradient plus the L2 term over the last ~10 steps: about 1 means the gradient averages to
    nothing and the decay alone moves the tensor (toward 0); >> 1 means it learns."""
    beta1 = optimizer["param_groups"][0]["betas"][0]
    cells = []
    for index, tensor in enumerate(weights.values()):
        moment = optimizer["state"][index]
        first = moment["exp_avg"] / (1 - beta1 ** float(moment["step"]))
        cells.append(f"{float(first.abs().mean() / (decay * tensor.abs().mean())):.3g}")
    return cells


def _magnitude_lines(runs_dir: Path, finished_only: bool = False) -> list[str]:
    """Mean |w| of each of phi's weight tensors per run, beside the authors' phi when converted
    (untrained: about 0.008), and how much of each tensor's movement is weight decay."""
    from metaperturb.hub import load_phi

    entries, signals = [], []
    for run in _runs(runs_dir):
        if finished_only and not _finished(run):
            continue
        found = _phi_state(run)
        if found is None:
            continue
        label = f"{run.name} ({found[0]})"
        entries.append((label, found[1]))
        if found[2] is not None:
            config = json.loads((run / "train_config.json").read_text())
            signals.append(
                (label, _signal_over_decay(found[1], found[2], config["phi_weight_decay"]))
            )
    if (AUTHORS_PHI / "model.safetensors").is_file():
        entries.append(("authors' phi (perturb_750)", load_phi(AUTHORS_PHI).state_dict()))
    if not entries:
        return []
    names = list(entries[0][1])
    header = ["| phi | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    lines = ["phi's weights, mean absolute value per tensor:", "", *header]
    for label, state in entries:
        cells = " | ".join(f"{float(state[name].abs().mean()):.4f}" for name in names)
        lines.append(f"| {label} | {cells} |")
    if signals:
        lines += [
            "",
            (
                "Gradient signal over weight decay, |Adam's first moment| / (decay x |w|) per "
                "tensor: about 1, the gradient averages to nothing and the decay alone moves the "
                "tensor toward 0; much more than 1, the tensor learns."
            ),
            "",
            *header,
        ]
        lines += [f"| {label} | {' | '.join(cells)} |" for label, cells in signals]
    return lines + ["", *_noise_path_lines(entries)]


def _noise_path_lines(entries: list[tuple[str, dict[str, torch.Tensor]]]) -> list[str]:
    """How alive phi's noise path is: the share of positions where its first op E1(h) is positive,
    so that relu(E1(h)) passes anything to mu. At 0%, mu is 0 whatever the input and no gradient
    reaches the noise weights again: on block outputs (>= 0 after a ReLU) E1 kernels that went
    negative kill the path for good; on the signed sums before the ReLU they cannot."""
    import timm

    import metaperturb
    from metaperturb.train.metrics import noise_path_alive

    placements: tuple[Literal["output", "before_activation"], ...] = ("output", "before_activation")
    torch.manual_seed(0)
    images = torch.randn(16, 3, 32, 32)
    lines = [
        (
            "Noise path alive: % of positions where phi's first noise op E1(h) > 0 (so relu(E1(h)) "
            "reaches mu), mean over the 9 sites of an untrained ResNet-20 wrapped with that phi (eval, "
            "expectation) on N(0, 1) images (metaperturb.train.metrics.noise_path_alive); 0 "
            "means mu = 0 for any input and no gradient reaches the noise weights:"
        ),
        "",
        "| phi | on block outputs (placement output) | before the last ReLU (before_activation) |",
        "| --- | ---: | ---: |",
    ]
    for label, state in entries:
        cells = []
        for placement in placements:
            phi = metaperturb.Perturbation()
            phi.load_state_dict(state)
            torch.manual_seed(0)  # the same untrained network for every phi
            net = timm.create_model("cifar_resnet20", num_classes=10)
            model = metaperturb.wrap(net, phi=phi, input_size=(3, 32, 32), placement=placement)
            shares = list(noise_path_alive(model, images).values())
            cells.append(f"{100 * sum(shares) / len(shares):.1f}")
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", type=Path, default=RUNS, help="where the runs go")
    parser.add_argument("--target-dir", type=Path, default=TARGET, help="where install writes")
    steps = parser.add_subparsers(dest="step", required=True)
    train_parser = steps.add_parser("train", help="meta-train, one run per seed (resumable)")
    train_parser.add_argument("--runs", type=int, default=5)
    train_parser.add_argument("--steps", type=int, default=750)
    train_parser.add_argument("--data", type=Path, default=SOURCE)
    train_parser.add_argument(
        "--seeds", type=int, nargs="+", help="only these seeds (one process each, in parallel)"
    )
    train_parser.add_argument("--threads", type=int, help="torch CPU threads per run")
    train_parser.add_argument(
        "--placement",
        choices=["output", "before_activation"],
        default="output",
        help="where phi acts in the task networks; before_activation runs go to preact-seed-<k>",
    )
    select_parser = steps.add_parser("select", help="score the finished runs")
    # The full schedule: a site phi closes shows only once the strength reaches 1, at 40% of
    # the steps (phi*'s first selection ran 2,000 steps on CIFAR-10 alone and missed it).
    select_parser.add_argument("--steps", type=int, default=10_000)
    select_parser.add_argument(
        "--many-class",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also meta-test on 100 Omniglot background classes (the score is the mean)",
    )
    select_parser.add_argument(
        "--pre-activation-task",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"also meta-test {PRE_ACTIVATION_MODEL} on the CIFAR-10 slice (signed block outputs)",
    )
    select_parser.add_argument(
        "--screen-closed-sites",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pass over a run that closes a site at full strength for one that closes none",
    )
    select_parser.add_argument("--seeds", type=int, default=1)
    select_parser.add_argument("--data", type=Path, default=VALIDATION)
    steps.add_parser("install", help="copy the winner to weights/phi-star with its model card")
    steps.add_parser("status", help="progress, wall time and last metrics of every run")
    args = parser.parse_args()
    {"train": train, "select": select, "install": install, "status": status}[args.step](args)


if __name__ == "__main__":
    main()
