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

from .errors import FlushDenormalError

#: The help of every command line's ``--flush-denormal``.
FLUSH_DENORMAL_HELP = (
    "flush denormal floats to zero on the CPU: several times faster once the gradients get "
    "tiny (after the learning-rate decay), and another floating-point path (recorded in the "
    "result's segments)"
)

__all__ = [
    "cpu_features",
    "cpu_model",
    "describe",
    "flush_denormals",
    "flushes_denormals",
    "label",
    "set_up_cpu",
    "with_segment",
]


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


def flushes_denormals() -> bool:
    """Whether this process's CPU arithmetic flushes denormal floats to zero, read from the CPU
    itself (torch sets the mode but cannot report it): denormals times one, on a tensor large
    enough that every intra-op thread takes a part, all give zero. Being a parallel operation, it
    starts torch's thread pool: call it after :func:`flush_denormals`, not before."""
    size = 65_536 * max(1, torch.get_num_threads())
    # Made from its bits: converting 1e-40 to float32 would itself be flushed.
    denormals = torch.full((size,), 1 << 20, dtype=torch.int32).view(torch.float32)
    return bool((denormals * 1.0 == 0).all())


def flush_denormals() -> None:
    """Flush denormal floats to zero in this process's CPU arithmetic.

    Once a network's gradients and Adam moments get tiny (after a learning-rate decay), a CPU
    computes them several times slower as denormals: WRN-28-2's training steps took 3.9 times
    longer at step 5,655 than with them flushed (``docs/development.md``). Flushing is another
    floating-point path, which :func:`describe` records.

    The mode is a per-thread CPU register that new threads copy from the one that starts them,
    so this must run before torch's first parallel CPU operation starts its thread pool; it
    checks that every thread flushes."""
    if not torch.set_flush_denormal(True):
        raise FlushDenormalError(
            "this CPU cannot flush denormal floats to zero (it needs SSE3 on x86); "
            "leave out --flush-denormal"
        )
    if not flushes_denormals():
        torch.set_flush_denormal(False)
        raise FlushDenormalError(
            "denormals are flushed on this thread but not on torch's intra-op threads, which "
            "started before: flush them before any torch computation (or run with one thread)"
        )


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
        "flush_denormal": flushes_denormals(),
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
    flushed = ", denormals flushed to zero" if machine.get("flush_denormal") else ""
    plural = "s" if threads != 1 else ""
    return f"{where}, {threads} thread{plural}{flushed}, torch {machine.get('torch')}"


def with_segment(
    earlier: list[dict[str, Any]], from_step: int, to_step: int, **where: Any
) -> list[dict[str, Any]]:
    """``earlier`` segments plus this process's, ``{"from_step", "to_step", **where}`` (where it
    ran: ``machine=`` for an evaluation run, ``machines=`` per rank for meta-training), if it
    trained any step."""
    if to_step <= from_step:
        return list(earlier)
    return [*earlier, {"from_step": from_step, "to_step": to_step, **where}]


def set_up_cpu(threads: int | None, flush_denormal: bool = False) -> None:
    """A command line's ``--flush-denormal`` and ``--threads``, in the order flushing needs:
    before the first parallel operation starts torch's threads. ``threads`` 0 or ``None``:
    torch's default. Raises :class:`~metaperturb.errors.FlushDenormalError`."""
    if flush_denormal:
        flush_denormals()
    if threads:
        torch.set_num_threads(threads)
