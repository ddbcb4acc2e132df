"""What a run records: per-task losses and accuracies, phi's channel scale per site, as JSONL.

One JSON object per line, written by rank 0 every ``log_every`` steps::

    {"step": 20, "elapsed_s": 41.2, "steps_per_s": 0.49,
     "tasks": {"0": {"train_loss": 4.1, "train_acc": 0.05, "heldout_loss": 4.3, "heldout_acc": 0.04}, ...},
     "mean": {"train_loss": ..., "train_acc": ..., "heldout_loss": ..., "heldout_acc": ...},
     "scale": {"stages.0.0": 0.51, ...},
     "noise_alive": {"stages.0.0": 0.43, ...},
     "phi": {"noise_in.self_weight": 0.012, ...}}

Losses and accuracies are averaged over the steps since the previous line; ``scale`` is phi's
channel scale s at each site computed from the running statistics (what a network sees at test
time), averaged over channels and tasks; ``phi`` is the mean absolute value of each of phi's
weight tensors, which shows a weight growing or a part of phi decaying to zero (its weight decay
winning over its gradient: the noise mean ``mu`` near 0 makes the noise input-independent);
``noise_alive`` is :func:`noise_path_alive` on 32 held-out images of each task, averaged over
tasks (0 at every site: phi's noise path died and cannot recover).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from .._atomic import atomic_write
from .._modes import preserved_modes
from ..diagnostics import mean_channel_scales
from ..wrapper import get_controller

__all__ = [
    "Meter",
    "MetricsLog",
    "noise_path_alive",
    "phi_magnitudes",
    "read_metrics",
    "site_scales",
    "summarize",
]

_FIELDS = ("train_loss", "train_acc", "heldout_loss", "heldout_acc")


class Meter:
    """Sums of loss, correct predictions and examples, kept on the device (no sync per step)."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(2, 3, dtype=torch.float64, device=device)

    def add(self, half: str, loss: Tensor, logits: Tensor, labels: Tensor) -> None:
        row = 0 if half == "train" else 1
        count = labels.shape[0]
        correct = (logits.argmax(dim=1) == labels).sum()
        self.sums[row, :2] += torch.stack([loss.double() * count, correct.double()])
        # A Python number, not a tensor made from one: that would be a host-to-device copy,
        # which waits for the GPU.
        self.sums[row, 2] += count

    def collect(self) -> dict[str, float]:
        """The averages since the last call, then reset."""
        sums = self.sums.tolist()
        self.sums.zero_()
        out = {}
        for prefix, (loss, correct, count) in zip(("train", "heldout"), sums, strict=True):
            out[f"{prefix}_loss"] = loss / count if count else float("nan")
            out[f"{prefix}_acc"] = correct / count if count else float("nan")
        return out


def site_scales(model: nn.Module) -> dict[str, float]:
    """phi's channel scale s at each site of a wrapped ``model``, averaged over channels, from
    the running statistics as in eval mode (the metrics log's ``scales``)."""
    return mean_channel_scales(model)


@torch.no_grad()
def noise_path_alive(model: nn.Module, images: Tensor) -> dict[str, float]:
    """Per site, the share of positions where phi's first noise op E1(h) is positive, on one eval
    forward of ``images``: the part of phi's input that reaches the noise mean
    ``mu = E2(relu(E1(h)))``. At 0 everywhere the path is dead: mu = 0 for any input and no
    gradient reaches the noise weights again (with phi on ReLU outputs, E1 kernels that drift
    negative do this). Eval mode, expectation: no random draw and no statistic changes."""
    controller = get_controller(model)
    phi = cast(Any, controller.phi)
    real = controller.site_function
    shares: list[float] = []

    def spy(h: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        first = phi.noise_in(h.to(phi.scale_weight.dtype))
        shares.append(float((first > 0).float().mean()))
        return cast(Tensor, real(h, *args, **kwargs))

    mode = controller.eval_mode
    controller.site_function, controller.eval_mode = spy, "expectation"
    try:
        with preserved_modes(model):
            model.eval()
            model(images)
    finally:
        controller.site_function, controller.eval_mode = real, mode
    return dict(zip(controller.site_names, shares, strict=False))


@torch.no_grad()
def phi_magnitudes(phi: nn.Module) -> dict[str, float]:
    """Mean absolute value of each of phi's weight tensors (untrained: about 0.008)."""
    return {name: float(p.abs().mean()) for name, p in phi.named_parameters()}


def summarize(task_records: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Merge per-task records ({task: {metrics..., "scale": {site: s}}}) into one log entry."""
    tasks = {str(t): {k: task_records[t][k] for k in _FIELDS} for t in sorted(task_records)}
    mean = {k: sum(r[k] for r in tasks.values()) / len(tasks) for k in _FIELDS}
    merged: dict[str, dict[str, list[float]]] = {"scale": {}, "noise_alive": {}}
    for record in task_records.values():
        for key, per_site in merged.items():
            for site, value in record.get(key, {}).items():
                per_site.setdefault(site, []).append(value)
    return {
        "tasks": tasks,
        "mean": mean,
        **{
            key: {site: sum(v) / len(v) for site, v in per_site.items()}
            for key, per_site in merged.items()
        },
    }


class MetricsLog:
    """The JSONL metrics file of a run; a resumed run first drops lines past its checkpoint."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        if resume_step is None:
            path.write_text("")
            return
        kept = [r for r in read_metrics(path) if r["step"] <= resume_step] if path.exists() else []
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics log; a truncated last line (a crash mid-write) is skipped."""
    records = []
    lines: Iterable[str] = Path(path).read_text().splitlines()
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
