"""How much channels_last speeds up the evaluation harness's runs on a CPU.

The harness (``metaperturb eval``, ``benchmarks/transfer.py``) trains and tests in
channels_last on a CPU by default; this measures why: the ResNet-20 training step and eval
forward, Base and MetaPerturb, NCHW against channels_last, timed interleaved in one process
(medians of ``--repeats`` rounds, as ``benchmarks/overhead.py`` does), at the thread count the
CPU sweeps use.

Usage:
    python benchmarks/channels_last.py                 # writes results/channels-last-cpu-1t.{json,md}
    python benchmarks/channels_last.py --threads 2
    python benchmarks/channels_last.py --model cifar_mobilenetv2_100 --repeats 3 --steps 1
                                       # another of the harness's networks: ...-1t-MODEL.{json,md}
    python benchmarks/channels_last.py --quick         # a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from dataclasses import replace

import timm
import torch
from overhead import RESULTS, Workload, eval_fn, interleaved, make, train_step_fn, workloads
from torch import nn

import metaperturb
from metaperturb._atomic import atomic_write

#: The network of the file without a model in its name (results/channels-last-cpu-1t.md).
DEFAULT_MODEL = "cifar_resnet20"
LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}


def build(workload: Workload, wrapped: bool, layout: torch.memory_format) -> nn.Module:
    model = make(workload, "fast" if wrapped else "unwrapped", torch.device("cpu"))
    return model.to(memory_format=layout)


def sampled_eval(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    forward = eval_fn(model, x, None)
    metaperturb.set_eval_mode(model, "sample")  # one draw: what each MC-K pass costs
    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--eval-batch", type=int, default=500, help="the harness's test chunk")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="a timm name of the harness's networks (32 px, batch 128), e.g. cifar_resnet18",
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workload = workloads("cpu", args.quick)[0]  # ResNet-20, 32 px, batch 128
    if args.model != DEFAULT_MODEL:
        name = args.model
        workload = replace(
            workload,
            name=workload.name.replace("resnet20", name),
            build=lambda: timm.create_model(name),
        )
    repeats, steps = (1, 1) if args.quick else (args.repeats, args.steps)
    batch = 4 if args.quick else workload.batch
    eval_batch = 4 if args.quick else args.eval_batch
    x = torch.randn(batch, *workload.input_size)
    y = torch.randint(0, workload.classes, (batch,))
    x_eval = torch.randn(eval_batch, *workload.input_size)

    measures: dict[str, dict[str, Callable[[], None]]] = {
        "train step (fwd+bwd+Adam)": {},
        "eval forward": {},
    }
    for layout_name, layout in LAYOUTS.items():
        for wrapped in (False, True):
            method = "MetaPerturb" if wrapped else "Base"
            key = f"{method}, {layout_name}"
            measures["train step (fwd+bwd+Adam)"][key] = train_step_fn(
                build(workload, wrapped, layout), x.contiguous(memory_format=layout), y, None
            )
            inputs = x_eval.contiguous(memory_format=layout)
            measures["eval forward"][f"{key}, expectation" if wrapped else key] = eval_fn(
                build(workload, wrapped, layout), inputs, None
            )
            if wrapped:
                measures["eval forward"][f"{key}, one sample"] = sampled_eval(
                    build(workload, wrapped, layout), inputs
                )

    rows = []
    usage = process_times()
    for measure, fns in measures.items():
        seconds = interleaved(fns, torch.device("cpu"), steps, repeats)
        for key, value in seconds.items():
            if "NCHW" not in key:
                continue
            other = key.replace("NCHW", "channels_last")
            rows.append(
                {
                    "measure": measure,
                    "configuration": key.replace(", NCHW", ""),
                    "nchw_ms": value * 1000,
                    "channels_last_ms": seconds[other] * 1000,
                    "speedup": value / seconds[other],
                }
            )
    header = (
        f"{platform.machine()}, {args.threads} thread(s), torch {torch.__version__}; "
        f"{workload.name}, eval batch {eval_batch}; medians of {repeats} interleaved rounds "
        f"x {steps} steps"
    )
    # The process's own account of the timing rounds: a large system share (page faults, thread
    # waits) says its times are not those of a training run with one network in its process.
    spent = {key: value - usage[key] for key, value in process_times().items()}
    report = {"header": header, "rows": rows, "process": spent, "args": vars(args)}
    table = render(report)
    print(table)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        model = "" if args.model == DEFAULT_MODEL else f"-{args.model}"
        stem = RESULTS / f"channels-last-cpu-{args.threads}t{model}"
        atomic_write(stem.with_suffix(".json"), json.dumps(report, indent=1) + "\n")
        atomic_write(stem.with_suffix(".md"), table + "\n")


def process_times() -> dict[str, float]:
    """Wall, user and system seconds of this process so far (user and system: Unix only)."""
    times = {"wall_s": time.perf_counter()}
    try:
        import resource
    except ImportError:  # Windows
        return times
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {**times, "user_s": usage.ru_utime, "system_s": usage.ru_stime}


def render(report: dict) -> str:
    spent = report.get("process", {})
    account = (
        f"Timing rounds: {spent['wall_s']:.0f} s wall, {spent['user_s']:.0f} s user and "
        f"{spent['system_s']:.0f} s system CPU time in this process."
        if "system_s" in spent
        else ""
    )
    lines = [
        report["header"],
        *([account] if account else []),
        "",
        "| measure | configuration | NCHW (ms) | channels_last (ms) | speed-up |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['measure']} | {row['configuration']} | {row['nchw_ms']:.1f} | "
            f"{row['channels_last_ms']:.1f} | {row['speedup']:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
