"""Where phi's cost goes: the overhead left when one part of phi is replaced by a free stand-in.

Each ablation swaps one part of the site for a stand-in of the same shape that still connects
the gradient (so the backward graph keeps its shape) but costs next to nothing:

* ``scale convs``: the four 3x3 convolutions + relu + pooling of the scale statistics become a
  per-channel mean;
* ``noise convs``: the two channel-equivariant convolutions of the noise mean ``mu`` become a
  scalar multiple of ``h``;
* ``gaussian draws``: ``torch.randn`` becomes zeros;
* ``all three``: what is left is the elementwise work (softplus, gain, clamp and their backward)
  and the hooks.

It measures the sites' PyTorch path (what runs without the fused CPU kernels of
:mod:`metaperturb._native`, which fuse these parts and cannot be taken apart this way).

The share of the overhead a part accounts for is ``(wrapped - ablated) / (wrapped - unwrapped)``.
The stand-ins compute something else, so these runs are for timing only. Timings are medians
of interleaved rounds in one process, as in ``benchmarks/overhead.py``.

Usage:
    python benchmarks/overhead_breakdown.py            # writes results/overhead-breakdown-cpu.*
    python benchmarks/overhead_breakdown.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
from collections.abc import Callable, Iterator

import torch
from overhead import RESULTS, eval_fn, interleaved, make, train_step_fn, workloads
from torch import Tensor

import metaperturb.site as site_module
from metaperturb._atomic import atomic_write
from metaperturb.phi import Perturbation

ABLATIONS = {
    "scale convs": ("scale",),
    "noise convs": ("noise",),
    "gaussian draws": ("draws",),
    "all three": ("scale", "noise", "draws"),
}


def _free_scale_maps(phi: Perturbation, h: Tensor) -> Tensor:
    pooled = h.mean(dim=(2, 3)).unsqueeze(-1).expand(*h.shape[:2], 4)
    return pooled * phi._weight(phi.scale_kernels).sum()


def _free_noise_mean(phi: Perturbation, h: Tensor) -> Tensor:
    weights = [
        phi._weight(p).sum() for p in (*phi.noise_in.parameters(), *phi.noise_out.parameters())
    ]
    return h * torch.stack(weights).sum()


@contextlib.contextmanager
def ablated(parts: tuple[str, ...]) -> Iterator[None]:
    # setattr: these replace a method and a function for the duration, which typing forbids.
    replaced = [
        (Perturbation, "scale_maps", _free_scale_maps, "scale"),
        (Perturbation, "noise_mean", _free_noise_mean, "noise"),
        (site_module, "standard_normal_like", torch.zeros_like, "draws"),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _, _ in replaced]
    for owner, name, free, part in replaced:
        if part in parts:
            setattr(owner, name, free)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def _under(parts: tuple[str, ...], fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with ablated(parts):
            fn()

    return run


def step_fn(
    model: torch.nn.Module, measure: str, inputs: Tensor, labels: Tensor
) -> Callable[[], None]:
    if measure == "train":
        return train_step_fn(model, inputs, labels, None)
    return eval_fn(model, inputs, None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3, help="steps per round and configuration")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--quick", action="store_true", help="small inputs, 1 round")
    args = parser.parse_args()
    device = torch.device("cpu")
    repeats, steps = (1, 1) if args.quick else (args.repeats, args.steps)
    rows = []
    for workload in workloads("cpu", args.quick):
        inputs = torch.randn(workload.batch, *workload.input_size)
        labels = torch.randint(0, workload.classes, (workload.batch,))
        # The PyTorch path: the ablations replace its methods, which the fused kernels bypass.
        plain, wrapped = make(workload, "unwrapped", device), make(workload, "pytorch-ops", device)
        for measure in ("train", "eval"):
            fns = {
                "unwrapped": step_fn(plain, measure, inputs, labels),
                "wrapped": step_fn(wrapped, measure, inputs, labels),
            }
            for name, parts in ABLATIONS.items():
                if measure == "eval" and parts == ("draws",):
                    continue  # the expectation eval draws nothing
                model = make(workload, "fast", device)
                fns[name] = _under(parts, step_fn(model, measure, inputs, labels))
            times = interleaved(fns, device, steps, repeats)
            rows.append({"workload": workload.name, "measure": measure, "seconds": times})
    report = {
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "steps": steps,
        "repeats": repeats,
        "rows": rows,
    }
    text = render(report)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        atomic_write(RESULTS / "overhead-breakdown-cpu.json", json.dumps(report, indent=2) + "\n")
        atomic_write(RESULTS / "overhead-breakdown-cpu.md", text + "\n")
    print(text)


def render(report: dict) -> str:
    title = (
        f"{report['device']}, {report['threads']} threads, torch {report['torch']}; medians of "
        f"{report['repeats']} interleaved rounds x {report['steps']} steps"
    )
    lines = [
        title,
        "",
        "| workload | measure | configuration | ms | / unwrapped | overhead removed |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for row in report["rows"]:
        seconds = row["seconds"]
        base, full = seconds["unwrapped"], seconds["wrapped"]
        for name, value in seconds.items():
            share = "" if name == "unwrapped" else f"{(full - value) / (full - base):.0%}"
            if name == "wrapped":
                share = "100%"
            label = name if name in ("unwrapped", "wrapped") else f"wrapped, {name} free"
            lines.append(
                f"| {row['workload']} | {row['measure']} | {label} | {value * 1e3:.1f} | "
                f"{value / base:.2f} | {share} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
