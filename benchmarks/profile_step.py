"""Where a wrapped model's step spends its time: ``torch.profiler`` tables beside the overhead
benchmark's ratios (the performance issue asks for a profile of whatever is left).

For each workload of ``benchmarks/overhead.py`` (same models, inputs and phi), profiles a few
training steps and eval forwards of the unwrapped and the wrapped model and writes, per
workload, the operators by self time: the host's own operators appear in both, phi's fused
kernels as ``metaperturb::*`` (their backward as ``metaperturb::*_backward``), phi's PyTorch ops
(GPU, autocast) under their own names.

    python benchmarks/profile_step.py                  # CPU: results/profile-cpu.txt
    python benchmarks/profile_step.py --channels-last
    python benchmarks/profile_step.py --device cuda    # results/profile-cuda.txt
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from overhead import RESULTS, eval_fn, make, setting, synchronize, train_step_fn, workloads
from torch.profiler import ProfilerActivity, profile

from metaperturb._atomic import atomic_write

ROWS = 25


def profiled(fn: Callable[[], None], device: torch.device, steps: int) -> tuple[str, float, float]:
    """(table by self time, total self time of the phi operators, total self time), in ms per
    step."""
    for _ in range(2):  # warm-up
        fn()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        synchronize(device)
    averages = prof.key_averages()
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attribute) for e in averages) / 1e3 / steps
    phi = sum(getattr(e, attribute) for e in averages if e.key.startswith("metaperturb::"))
    return averages.table(sort_by=attribute, row_limit=ROWS), phi / 1e3 / steps, total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small inputs: checks the script")
    args = parser.parse_args()
    device = torch.device(args.device)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    info = setting(device, autocast, args.steps, 1)
    sections = [
        f"{info['device']}, {info['threads']} threads, torch {info['torch']}, autocast "
        f"{info['autocast']}, {'channels_last' if args.channels_last else 'NCHW'}; "
        f"{args.steps} profiled steps after 2 warm-up steps. Times are per step. "
        f"Command: python benchmarks/profile_step.py --device {args.device}"
        + (" --channels-last" if args.channels_last else "")
    ]
    for workload in workloads(device.type, args.quick):
        x = torch.randn(workload.batch, *workload.input_size, device=device)
        x = x.contiguous(memory_format=layout)
        y = torch.randint(0, workload.classes, (workload.batch,), device=device)
        for variant in ("unwrapped", "fast"):
            model = make(workload, variant, device).to(memory_format=layout)
            for kind in ("train step", "eval forward"):
                # Made just before it runs: making one sets the model's train/eval mode.
                fn = (
                    train_step_fn(model, x, y, autocast)
                    if kind == "train step"
                    else eval_fn(model, x, autocast)
                )
                table, phi_ms, total_ms = profiled(fn, device, args.steps)
                title = f"## {workload.name}, {variant}, {kind}"
                summary = f"self time {total_ms:.1f} ms per step"
                if variant == "fast" and device.type == "cpu":  # elsewhere: PyTorch ops
                    summary += f", of which metaperturb:: kernels {phi_ms:.1f} ms"
                print(f"{title}: {summary}", flush=True)
                sections.append(f"{title}\n\n{summary}\n\n{table}")
    text = "\n\n".join(sections) + "\n"
    if not args.quick:
        suffix = "-cl" if args.channels_last else ""
        atomic_write(RESULTS / f"profile-{device.type}{suffix}.txt", text)
    else:
        print(text[:2000])


if __name__ == "__main__":
    main()
