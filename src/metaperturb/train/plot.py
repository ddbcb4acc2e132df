"""A PNG of a run's metrics log: losses, accuracies, phi's channel scale per site and its weights."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

from .._atomic import atomic_write
from .metrics import read_metrics

__all__ = ["plot_metrics"]


def plot_metrics(run: str | os.PathLike[str], output: str | os.PathLike[str] | None = None) -> Path:
    """Draw the metrics log of ``run`` (a run folder or a ``metrics.jsonl``) to a PNG.

    Panels against the step: train and held-out loss, train and held-out accuracy (mean over
    tasks, each task faint behind), phi's channel scale s at every site, and (logs that record
    it) the mean |w| of each of phi's weight tensors on a log scale, where a part of phi
    decaying to zero shows.

    Args:
        run: the run folder, or the metrics file itself.
        output: the PNG to write; default: ``metrics.png`` beside the log.

    Returns:
        The PNG written.

    Example:
        >>> plot_metrics("metaperturb-run")  # doctest: +SKIP
        PosixPath('metaperturb-run/metrics.png')
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    path = Path(run)
    log = path / "metrics.jsonl" if path.is_dir() else path
    if not log.is_file():
        raise FileNotFoundError(f"no metrics log at {log}: pass a run folder or a metrics.jsonl.")
    records = read_metrics(log)
    if not records:
        raise ValueError(f"{log} holds no metrics yet (a line is written every --log-every steps).")
    target = Path(output) if output is not None else log.with_name("metrics.png")
    steps = [record["step"] for record in records]
    tasks = sorted(records[-1]["tasks"], key=int)

    weights = list(next((r["phi"] for r in reversed(records) if "phi" in r), {}))
    panels = 4 if weights else 3
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), constrained_layout=True)
    for axis, metric in zip(axes[:2], ("loss", "acc"), strict=True):
        for half, colour in (("train", "tab:blue"), ("heldout", "tab:orange")):
            key = f"{half}_{metric}"
            for task in tasks:
                values = [r["tasks"].get(task, {}).get(key, math.nan) for r in records]
                axis.plot(steps, values, color=colour, alpha=0.15, linewidth=0.8)
            label = f"{'held-out' if half == 'heldout' else half} (mean of {len(tasks)} tasks)"
            axis.plot(steps, [r["mean"][key] for r in records], color=colour, label=label)
        axis.set_xlabel("step")
        axis.set_ylabel("cross-entropy" if metric == "loss" else "accuracy")
        axis.legend()
    sites = list(records[-1]["scale"])
    colours = plt.get_cmap("viridis")
    for index, site in enumerate(sites):
        values = [r["scale"].get(site, math.nan) for r in records]
        axes[2].plot(steps, values, color=colours(index / max(1, len(sites) - 1)), label=site)
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("channel scale s (mean over channels)")
    if len(sites) <= 12:
        axes[2].legend(fontsize="small")
    axes[0].set_title("loss")
    axes[1].set_title("accuracy")
    axes[2].set_title("phi's scale per site (running statistics)")
    if weights:
        for name in weights:
            values = [r.get("phi", {}).get(name, math.nan) for r in records]
            axes[3].plot(steps, values, label=name)
        axes[3].set_yscale("log")
        axes[3].set_xlabel("step")
        axes[3].set_ylabel("mean |w|")
        axes[3].legend(fontsize="small")
        axes[3].set_title("phi's weights")
    figure.suptitle(f"meta-training: {log.parent.name}")
    buffer = io.BytesIO()  # rendered whole, then moved into place: never half a plot
    figure.savefig(buffer, format=target.suffix.lstrip(".") or "png", dpi=100)
    plt.close(figure)
    atomic_write(target, buffer.getvalue())
    return target
