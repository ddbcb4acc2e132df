"""The evaluation's figures (issue: evaluation harness), drawn by ``transfer_report.py``.

One figure per question, a panel per target, one colour per method in every figure, and seeds
averaged (not one line per run, which made eleven lines of recycled colours):

- ``curves.png``: test accuracy vs step, mean over seeds with the seeds' range shaded (the
  paper's Figure 5);
- ``reliability.png``: accuracy vs confidence of the default eval, bins pooled over seeds (those
  with 20 images or more drawn), ECE in the legend;
- ``scales.png``: phi's learned channel scale s per block, a line per target (Figure 7).

ResNet-20 runs with phi on block outputs only: the placement study and phi candidates have
their own tables in ``transfer.md``.
"""

from __future__ import annotations

import io
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from transfer_readme import grouped

from metaperturb._atomic import atomic_write

__all__ = ["SCALED", "curve_points", "mean_scales", "plots", "plotted"]

# A colour per method, the same in every figure and every panel.
COLOURS = {
    "base": "0.35",
    "metaperturb[phi-star]": "C3",
    "metaperturb[phi-star,without-site]": "C7",  # exclude=[...]: sites left without phi
    "metaperturb[phi-star,exclude-closed]": "C8",  # sites switched off as they closed
    "metaperturb[authors]": "C1",
    "dropblock": "C2",
    "mixup": "C4",
    "finetune": "C5",
    "finetune+metaperturb[phi-star]": "C6",
    "finetune+metaperturb[phi-star,exclude-closed]": "C9",
}
#: The methods whose learned scales are drawn (a panel each).
SCALED = ("metaperturb[phi-star]", "metaperturb[authors]")
MIN_BIN = 20  # images: emptier confidence bins are noise (one image is 0% or 100%)
TARGET_COLOURS = {
    "s-cifar10": "C0",
    "s-fashion-mnist": "C1",
    "mnist-10k": "C2",
    "omniglot-100": "C4",
}


def _family(method: str) -> str:
    """The method without its settings: ``dropblock[0.05,5]`` -> ``dropblock``, the
    fine-tuning source dropped from ``finetune[...]``, and the sites left out unnamed."""
    method = re.sub(r"(,without-[^],]+)+\]", ",without-site]", method)
    return re.sub(r"(dropblock|mixup|finetune)\[[^]]*\]", r"\1", method)


def _seeds(count: int) -> str:
    return f"{count} seed{'s' if count > 1 else ''}"


def plotted(run: dict[str, Any]) -> bool:
    """Whether a run is drawn (and tabled beside the figures): ResNet-20, a colour's method."""
    return run["model"] == "cifar_resnet20" and _family(run["method"]) in COLOURS


def _by(runs: list[dict[str, Any]], key: str) -> dict[str, list[dict[str, Any]]]:
    return {value: group for (value,), group in grouped(runs, key).items()}


def _order(methods: list[str]) -> list[str]:
    rank = list(COLOURS)
    return sorted(methods, key=lambda m: (rank.index(_family(m)), m))


def curve_points(runs: list[dict[str, Any]]) -> dict[str, dict[int, list[float]]]:
    """One target's curves: each method's test accuracies (%) at each step, a value per seed,
    methods in legend order."""
    methods = _by([r for r in runs if r["curve"]], "method")
    curves: dict[str, dict[int, list[float]]] = {}
    for method in _order(list(methods)):
        points: dict[int, list[float]] = defaultdict(list)
        for run in methods[method]:
            for point in run["curve"]:
                points[point["step"]].append(point["test_accuracy"] * 100)
        curves[method] = dict(sorted(points.items()))
    return curves


def _curves(axis: Any, runs: list[dict[str, Any]]) -> None:
    for method, points in curve_points(runs).items():
        steps = list(points)
        colour = COLOURS[_family(method)]
        seeds = len(points[steps[0]])
        mean = [statistics.mean(points[s]) for s in steps]
        axis.plot(steps, mean, color=colour, label=f"{method} ({_seeds(seeds)})")
        if seeds > 1:
            low = [min(points[s]) for s in steps]
            high = [max(points[s]) for s in steps]
            axis.fill_between(steps, low, high, color=colour, alpha=0.15, linewidth=0)
    axis.set(xlabel="step", ylabel="test accuracy % (curve subset)")


def _reliability(axis: Any, runs: list[dict[str, Any]]) -> None:
    methods = _by(runs, "method")
    for method in _order(list(methods)):
        pooled: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
        for run in methods[method]:
            for index, b in enumerate(run["evaluation"]["default"]["reliability"]):
                if not b["count"]:  # an empty bin has no confidence
                    continue
                total = pooled[index]
                total[0] += b["count"]
                total[1] += b["confidence"] * b["count"]
                total[2] += b["accuracy"] * b["count"]
        bins = [pooled[i] for i in sorted(pooled) if pooled[i][0] >= MIN_BIN]
        ece = statistics.mean(r["ece"] for r in methods[method]) * 100
        axis.plot(
            [b[1] / b[0] for b in bins],
            [b[2] / b[0] for b in bins],
            marker="o",
            markersize=3,
            color=COLOURS[_family(method)],
            label=f"{method} (ECE {ece:.1f}%)",
        )
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
    axis.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))


def mean_scales(runs: list[dict[str, Any]], method: str) -> dict[str, tuple[int, list[float]]]:
    """phi's learned scale per block under ``method``, on each target: (seeds, mean per block)."""
    scales = {}
    for target, target_runs in _by([r for r in runs if r["method"] == method], "target").items():
        per_site = [list(r["scales"].values()) for r in target_runs if r["scales"]]
        if per_site:
            mean = [statistics.mean(values) for values in zip(*per_site, strict=True)]
            scales[target] = (len(per_site), mean)
    return scales


def _scales(axis: Any, runs: list[dict[str, Any]], method: str) -> None:
    for target, (seeds, mean) in mean_scales(runs, method).items():
        axis.plot(
            range(len(mean)),
            mean,
            marker="o",
            color=TARGET_COLOURS.get(target),
            label=f"{target} ({_seeds(seeds)})",
        )
    axis.set(
        xlabel="block (input -> output)", ylabel="mean channel scale s", title=method, ylim=(0, 1)
    )


def plots(results: list[dict[str, Any]], folder: Path) -> list[Path]:
    """Draw the three figures into ``folder``; returns their paths (none without results)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results if plotted(r)]
    if not runs:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    by_target = _by(runs, "target")
    order = list(TARGET_COLOURS)  # the presets' table order; any other target after them
    targets = sorted(by_target, key=lambda t: (order.index(t) if t in order else len(order), t))
    steps = runs[0]["steps"]
    written = []
    for name, draw, title in (
        ("curves", _curves, "test accuracy vs step"),
        ("reliability", _reliability, "reliability of the default eval"),
    ):
        figure, axes = plt.subplots(
            1, len(targets), figsize=(5.5 * len(targets), 4.2), constrained_layout=True
        )
        for axis, target in zip(figure.axes if len(targets) > 1 else [axes], targets, strict=True):
            draw(axis, by_target[target])
            axis.set_title(target)
            axis.legend(fontsize="x-small")
        figure.suptitle(f"{title}: ResNet-20, {steps} steps, mean over seeds")
        written.append(_save(figure, folder / f"{name}.png", plt))
    methods = [m for m in SCALED if m in _by(runs, "method")]
    if methods:
        figure, axes = plt.subplots(
            1, len(methods), figsize=(5.5 * len(methods), 4.2), constrained_layout=True
        )
        for axis, method in zip(figure.axes, methods, strict=True):
            _scales(axis, runs, method)
            axis.legend(fontsize="x-small")
        figure.suptitle(f"phi's learned scale per block on each target: ResNet-20, {steps} steps")
        written.append(_save(figure, folder / "scales.png", plt))
    return written


def _save(figure: Any, path: Path, plt: Any) -> Path:
    buffer = io.BytesIO()  # rendered whole, then moved into place: no half-written plot
    figure.savefig(buffer, format=path.suffix.lstrip("."), dpi=90)
    plt.close(figure)
    return atomic_write(path, buffer.getvalue())
