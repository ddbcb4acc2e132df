"""Tables and plots from the evaluation results (``benchmarks/results/transfer/*.json``).

    python benchmarks/transfer_report.py                 # the paper's schedule (10,000 steps)
    python benchmarks/transfer_report.py --steps 4000    # a shorter sweep, labelled as such

Writes ``benchmarks/results/transfer.md`` (the README's results tables) and PNGs in
``benchmarks/results/transfer-plots/``. Cells are mean +- standard deviation over seeds, with
the number of seeds; a cell without runs is left empty rather than guessed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any

from transfer_plots import SCALED, curve_points, mean_scales, plots, plotted
from transfer_readme import TARGETS as PRESETS
from transfer_readme import cell, grouped, scored, table, update_readme

from metaperturb._atomic import atomic_write
from metaperturb._machine import label as machine_label

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "transfer"
TARGETS = tuple(PRESETS)  # the presets, in table order


def _read(folder: Path, steps: int) -> list[dict[str, Any]]:
    """Every result of this schedule: targets (named) and tuning runs (a slice, a dict), each
    with only the evaluations that gave a score (``scored``)."""
    results = [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
    return [scored(r) for r in results if r.get("steps") == steps]


def load_results(folder: Path, steps: int) -> list[dict[str, Any]]:
    results = [r for r in _read(folder, steps) if isinstance(r.get("target"), str)]
    current = _phi_star_fingerprint()
    stale = [
        r
        for r in results
        if re.search(r"\[phi-star[],]", r["method"]) and r.get("phi_fingerprint") != current
    ]
    if stale:
        print(f"note: left out {len(stale)} phi* runs made with another phi* than weights/phi-star")
    results = [r for r in results if r not in stale]
    # A phi evaluated under another name (a phi* candidate before `select` chose it) with the
    # numbers of the installed phi* is phi*: one row, named so (a ",pre-act" placement kept).
    for result in results:
        if current is not None and result.get("phi_fingerprint") == current:
            result["method"] = re.sub(
                r"metaperturb\[[^],]*", "metaperturb[phi-star", result["method"]
            )
    return results


def _phi_star_fingerprint() -> str | None:
    """The fingerprint metaperturb eval records for the phi* now in weights/ (None: none yet)."""
    from metaperturb.hub import default_phi_path, load_phi

    path = default_phi_path()
    return load_phi(path).fingerprint() if (path / "model.safetensors").is_file() else None


def datasets_table(results: list[dict[str, Any]]) -> list[str]:
    runs = [r for r in results if r["model"] == "cifar_resnet20"]
    groups = grouped(runs, "method", "target")
    methods = sorted({r["method"] for r in runs}, key=lambda m: (m != "base", m))
    targets = [t for t in TARGETS if any(r["target"] == t for r in runs)]
    rows = [
        [m] + [cell(r["accuracy"] for r in groups.get((m, t), [])) for t in targets]
        for m in methods
    ]
    return table(["method \\ target (ResNet-20, test accuracy %)", *targets], rows)


def architectures_table(results: list[dict[str, Any]]) -> list[str]:
    runs = [r for r in results if r["target"] == "s-cifar10"]
    groups = grouped(runs, "model", "method")
    models = sorted({r["model"] for r in runs})
    methods = [m for m in ("base", "metaperturb[phi-star]") if any(r["method"] == m for r in runs)]
    rows = [
        [model] + [cell(r["accuracy"] for r in groups.get((model, m), [])) for m in methods]
        for model in models
    ]
    return table(["network (s-CIFAR10, test accuracy %)", *methods], rows)


def modes_table(results: list[dict[str, Any]]) -> list[str]:
    """Every run's every eval mode, one row each, named by target, network, method and seed."""
    rows = []
    for result in results:
        evaluation = result["evaluation"]
        if "sample" not in evaluation and "update_bn" not in evaluation:
            continue  # a Base run from before update_bn was evaluated: nothing to compare
        for mode, scores in evaluation.items():
            label = {
                "default": f"default ({scores.get('mode', 'expectation')})",
                "sample": "one sample (MC-1)",
                "update_bn": "default after update_bn (BatchNorm statistics recomputed)",
            }
            rows.append(
                [
                    result["target"],
                    result["model"],
                    result["method"],
                    str(result["seed"]),
                    label.get(mode, mode),
                    f"{scores['accuracy'] * 100:.2f}",
                    f"{scores['ece'] * 100:.2f}",
                    f"{scores['seconds']:.1f}",
                    str(scores.get("nonfinite_predictions", 0)),
                ]
            )
    return table(
        [
            "target",
            "network",
            "method",
            "seed",
            "eval mode",
            "accuracy %",
            "ECE %",
            "seconds",
            "non-finite outputs",
        ],
        rows,
    )


#: The eval modes in the order of their cost, with the forward passes each takes per image.
MODES = {
    "off": ("off (phi skipped)", 1),
    "default": ("expectation (default)", 1),
    "update_bn": ("expectation after update_bn", 1),
    "sample": ("one sample (MC-1)", 1),
    "mc5": ("MC-5", 5),
    "mc100": ("MC-100", 100),
}


def modes_summary_table(results: list[dict[str, Any]]) -> list[str]:
    """Each eval mode's accuracy and ECE averaged over the runs that recorded it (the issue's
    evaluation-mode comparison: what K forwards buy); MetaPerturb runs on ResNet-20 only."""
    runs = [r for r in results if r["model"] == "cifar_resnet20" and "metaperturb" in r["method"]]
    rows = []
    for (target, method), group in sorted(grouped(runs, "target", "method").items()):
        for mode, (label, forwards) in MODES.items():
            scored = [r["evaluation"][mode] for r in group if mode in r["evaluation"]]
            if scored:
                rows.append(
                    [
                        target,
                        method,
                        label,
                        str(forwards),
                        cell(s["accuracy"] for s in scored),
                        cell(s["ece"] for s in scored),
                    ]
                )
    return table(["target", "method", "eval mode", "forwards", "accuracy %", "ECE %"], rows)


def update_bn_gain(results: list[dict[str, Any]]) -> list[str]:
    """What recomputing BatchNorm statistics after training adds to the default eval, in points:
    MetaPerturb runs against Base (the control), each run's gain and their mean."""
    lines = []
    for label, pick in (
        ("MetaPerturb", lambda r: "metaperturb" in r["method"]),
        ("Base", lambda r: r["method"] == "base"),
    ):
        gains = [
            (r["evaluation"]["update_bn"]["accuracy"] - r["accuracy"]) * 100
            for r in results
            if pick(r) and "update_bn" in r["evaluation"]
        ]
        if gains:
            lines.append(
                f"- {label}: {statistics.mean(gains):+.2f} points on average over {len(gains)} "
                f"runs ({min(gains):+.2f} to {max(gains):+.2f})"
            )
    return lines


def mean_confidence(reliability: list[dict[str, Any]]) -> float:
    """The mean top-class probability over the test images, from an evaluation's reliability
    bins: below the accuracy, the network is underconfident; above it, overconfident."""
    count = sum(b["count"] for b in reliability)
    return sum(b["count"] * b["confidence"] for b in reliability if b["count"]) / count


def calibration_table(results: list[dict[str, Any]]) -> list[str]:
    groups = grouped([r for r in results if r["model"] == "cifar_resnet20"], "target", "method")
    rows = [
        [
            target,
            method,
            cell(r["accuracy"] for r in runs),
            cell(mean_confidence(r["evaluation"]["default"]["reliability"]) for r in runs),
            cell(r["ece"] for r in runs),
        ]
        for (target, method), runs in sorted(groups.items())
    ]
    header = ["target", "method", "accuracy %", "mean confidence %", "ECE % (15 bins)"]
    return table(header, rows)


def _rank(target: str) -> tuple[int, str]:
    """Tables' target order: the presets', then any other target by name."""
    return (TARGETS.index(target) if target in TARGETS else len(TARGETS), target)


def curves_table(results: list[dict[str, Any]]) -> list[str]:
    """The accuracy-vs-step figure's numbers: each method's mean over seeds at each curve step
    (a fixed subset of the test split), per target."""
    runs = [r for r in results if plotted(r)]
    rows: list[list[str]] = []
    steps: list[int] = []
    for target in TARGETS:
        for method, points in curve_points([r for r in runs if r["target"] == target]).items():
            steps = steps or list(points)
            seeds = len(next(iter(points.values())))
            means = [f"{statistics.mean(points[s]):.2f}" if s in points else "" for s in steps]
            rows.append([target, f"{method} ({seeds})", *means])
    return table(["target", "method (seeds)", *(f"{s:,}" for s in steps)], rows) if rows else []


def scales_table(results: list[dict[str, Any]]) -> list[str]:
    """The scale figure's numbers: phi's mean channel scale s per block, per target, and the
    largest difference between two targets at any block."""
    runs = [r for r in results if plotted(r)]
    lines: list[str] = []
    for method in SCALED:
        scales = mean_scales(runs, method)
        if not scales:
            continue
        blocks = len(next(iter(scales.values()))[1])
        rows = [
            [f"{target} ({seeds})", *(f"{v:.3f}" for v in mean)]
            for target, (seeds, mean) in sorted(scales.items(), key=lambda item: _rank(item[0]))
        ]
        lines += [f"{method}:", "", *table(["target (seeds)", *map(str, range(blocks))], rows), ""]
        targets = sorted(scales, key=_rank)
        for i, first in enumerate(targets):
            for second in targets[i + 1 :]:
                gap = max(
                    abs(a - b) for a, b in zip(scales[first][1], scales[second][1], strict=True)
                )
                lines.append(f"- {first} vs {second}: at most {gap:.3f} apart")
        lines.append("")
    return lines


def switched_off_table(results: list[dict[str, Any]]) -> list[str]:
    """Each run with ``on_closed_site="exclude"``: the sites its scheduler switched off for
    closing, with the step (none: phi ran at every site), beside its accuracy."""
    runs = [r for r in results if r.get("config", {}).get("on_closed_site") == "exclude"]
    rows = [
        [
            r["target"],
            f"{r['model']}, {r['method']}",
            str(r["seed"]),
            ", ".join(f"`{s}` at step {k:,}" for s, k in (r.get("excluded_sites") or {}).items())
            or "none",
            f"{100 * r['accuracy']:.2f}",
        ]
        for r in sorted(runs, key=lambda r: (_rank(r["target"]), r["method"], r["seed"]))
    ]
    header = ["target", "network, method", "seed", "switched off", "accuracy %"]
    return table(header, rows) if rows else []


def machines_table(results: list[dict[str, Any]]) -> list[str]:
    """Where each part of each run trained (its ``segments``): a run resumed on another CPU
    took another floating-point path from there (docs/evaluation.md), so it is another sample
    of its setting. Runs older than the record are counted, not listed."""
    recorded = [r for r in results if r.get("segments")]
    rows = [
        [
            r["target"],
            f"{r['model']}, {r['method']}",
            str(r["seed"]),
            "; ".join(
                f"{s['from_step']:,}-{s['to_step']:,}: {machine_label(s['machine'])}"
                for s in r["segments"]
            ),
        ]
        for r in sorted(recorded, key=lambda r: (_rank(r["target"]), r["method"], r["seed"]))
    ]
    older = [r for r in results if not r.get("segments")]
    resumed = sum(bool(r.get("resumed")) for r in older)
    note = (
        f"{len(older)} runs finished before runs recorded this: their `machine` names the "
        "platform, torch and threads of the process that evaluated them, not the CPU; "
        f"{resumed} of them were resumed, so a part of each may have trained on another CPU."
    )
    lines = table(["target", "network, method", "seed", "steps: trained on"], rows) if rows else []
    return [*lines, *([""] if lines else []), note] if older else lines


def _is_tuning(run: dict[str, Any]) -> bool:
    """A `tune` run: its target is the CIFAR-10 validation slice (train images 500-999 of each
    class), not a named target, nor the Tiny ImageNet `pretrain` run (also a slice spec)."""
    target = run.get("target")
    return (
        isinstance(target, dict)
        and Path(str(target.get("data"))).name == "cifar10"
        and target.get("skip_per_class") == 500
    )


def tuning_table(folder: Path, steps: int) -> list[str]:
    """The `tune` runs (a CIFAR-10 validation slice, not a target): each setting's validation
    accuracy, and the one per family that the `datasets` grid uses (the best)."""
    runs = [r for r in _read(folder, steps) if _is_tuning(r)]
    best: dict[str, float] = {}
    for run in runs:
        family = run["method"].split("[")[0]
        best[family] = max(best.get(family, 0.0), run["accuracy"])

    def use(run: dict[str, Any]) -> str:
        if run["method"] == "base":
            return "control"
        return "used" if run["accuracy"] == best[run["method"].split("[")[0]] else ""

    rows = [
        [run["method"], f"{run['accuracy'] * 100:.2f}", use(run)]
        for run in sorted(runs, key=lambda r: (r["method"].split("[")[0], -r["accuracy"]))
    ]
    return table(["setting (ResNet-20, seed 0)", "validation accuracy %", "datasets grid"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--output", type=Path, default=ROOT / "benchmarks" / "results" / "transfer.md"
    )
    parser.add_argument(
        "--readme",
        type=Path,
        default=ROOT / "README.md",
        help="rewrite this file's generated results tables (only for the paper's schedule)",
    )
    args = parser.parse_args()
    results = load_results(args.results, args.steps)
    schedule = (
        "the paper's schedule" if args.steps == 10_000 else "a SHORTER schedule than the paper's"
    )
    lines = [
        f"Evaluation results: {len(results)} runs of {args.steps} steps ({schedule}), batch 128.",
        (
            "Command: `python benchmarks/transfer.py <grid>` then "
            f"`python benchmarks/transfer_report.py --steps {args.steps}`."
        ),
        "",
        "### Datasets",
        "",
        *datasets_table(results),
        "",
        "### Architectures",
        "",
        *architectures_table(results),
        "",
        "### Evaluation modes",
        "",
        "Averaged over the runs that recorded each mode (mean +- std (runs)):",
        "",
        *modes_summary_table(results),
        "",
        (
            "Gain of `update_bn` (BatchNorm statistics recomputed over 50 training batches) over "
            "the default eval:"
        ),
        "",
        *update_bn_gain(results),
        "",
        "Every run:",
        "",
        *modes_table(results),
        "",
        "### Calibration",
        "",
        *calibration_table(results),
        "",
        "### Test accuracy vs step (the curves figure)",
        "",
        *curves_table(results),
        "",
        "### phi's learned scale per block (the scales figure)",
        "",
        *scales_table(results),
        '### Sites switched off as they closed (`on_closed_site="exclude"`)',
        "",
        *(
            switched_off_table(results)
            or ["No run yet: `python benchmarks/transfer.py closed-site`."]
        ),
        "",
        "### Where the runs trained",
        "",
        *machines_table(results),
        "",
        "### Tuning (DropBlock rate and block size, Mixup alpha)",
        "",
        (
            "CIFAR-10 train images 500-749 of each class to train, 750-999 to test (disjoint "
            "from s-CIFAR10 and its test split); `python benchmarks/transfer.py tune`."
        ),
        "",
        *tuning_table(args.results, args.steps),
        "",
    ]
    for path in plots(results, args.output.parent / "transfer-plots"):
        lines.append(f"![{path.stem}]({path.relative_to(args.output.parent).as_posix()})")
    atomic_write(args.output, "\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.steps == 10_000:  # a shorter schedule's numbers never reach the README
        blocks = update_readme(args.readme, results)
        print(f"{args.readme}: rewrote the results tables {', '.join(blocks) or '(none found)'}")


if __name__ == "__main__":
    main()
