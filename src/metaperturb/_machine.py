"""What a run was trained on, beyond its settings.

A run's settings and seed fix its batches and its noise, but not its floating-point path: on a
CPU the same checkpoint trained 25 steps further gives other weights with two threads instead
of one, or with ATen's or oneDNN's kernels held to AVX2 on an AVX-512 machine
(``docs/evaluation.md``), and the difference grows with training. A run resumed on another
machine is therefore another sample of its setting, and the record has to say where each part
of it ran: :func:`describe` is that description, and a run (an evaluation run, or meta-training
with one per process) keeps one for each launch that trained part of it (its ``segments``).
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import Any

import torch

__all__ = ["cpu_features", "cpu_model", "describe", "label", "with_segment"]


def _cpuinfo(*fields: str) -> str | None:
    """The first ``/proc/cpuinfo`` line of one of ``fields`` (Linux), its value; else None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(fields):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux; what :mod:`platform` knows elsewhere)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_features() -> str | None:
    """A short digest of the CPU's feature flags: virtual machines often name every CPU alike
    ("Intel Xeon Processor"), and the flags are what the kernels dispatch on."""
    flags = _cpuinfo("flags", "Features")
    return None if flags is None else hashlib.sha256(flags.encode()).hexdigest()[:12]


def describe(device: torch.device, channels_last: bool) -> dict[str, Any]:
    """The machine facts that can change a run's floating-point results."""
    machine: dict[str, Any] = {
        "platform": platform.machine(),
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        # The instruction set ATen's CPU kernels were dispatched to (ATEN_CPU_CAPABILITY).
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": str(torch.__version__),  # a plain str: checkpoints are read weights_only
        "threads": torch.get_num_threads(),
        "device": str(device),
        "channels_last": channels_last,
    }
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    return machine


def label(machine: dict[str, Any] | None) -> str:
    """:func:`describe`'s facts in one line, for reports and model cards."""
    if machine is None:
        return "not recorded"
    threads = machine.get("threads")
    features = f", flags {machine['cpu_features']}" if machine.get("cpu_features") else ""
    where = (
        machine.get("gpu") or f"{machine.get('cpu')} ({machine.get('cpu_capability')}{features})"
    )
    return f"{where}, {threads} thread{'s' if threads != 1 else ''}, torch {machine.get('torch')}"


def with_segment(
    earlier: list[dict[str, Any]], from_step: int, to_step: int, **where: Any
) -> list[dict[str, Any]]:
    """``earlier`` segments plus this process's, ``{"from_step", "to_step", **where}`` (where it
    ran: ``machine=`` for an evaluation run, ``machines=`` per rank for meta-training), if it
    trained any step."""
    if to_step <= from_step:
        return list(earlier)
    return [*earlier, {"from_step": from_step, "to_step": to_step, **where}]
