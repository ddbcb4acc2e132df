"""What MetaPerturb costs: training step, eval forward and memory, wrapped / unwrapped.

Every ratio compares configurations timed in the same run, interleaved (round-robin over the
configurations, ``--repeats`` rounds, each the median of ``--steps`` steps), and reports the
median over rounds. "reference" is the obvious implementation of phi
(:mod:`metaperturb._reference`), "fast" the library's (on a CPU with the fused site kernels of
:mod:`metaperturb._native`, which draw their own noise), "torch-noise" the same kernels given
``torch.randn``'s noise instead (CPU), "pytorch-ops" the library's without those kernels,
"triton" (GPU) the library's with its sites as Triton kernels (:mod:`metaperturb._triton`,
opt-in; with phi frozen: its trainable-phi step is "fast"'s).

Usage:
    python benchmarks/overhead.py                      # CPU: the README table
    python benchmarks/overhead.py --device cuda        # GPU: resnet50 224px, batch 64, bf16
    python benchmarks/overhead.py --channels-last      # models and inputs in channels_last
    python benchmarks/overhead.py --quick              # a smoke run (CI-sized)
Writes a markdown table to stdout and JSON to benchmarks/results/overhead-<device>[-cl].json.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import metaperturb
from metaperturb._atomic import atomic_write
from metaperturb._kernels import standard_normal_like
from metaperturb._reference import reference_perturb
from metaperturb.site import perturb

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Workload:
    name: str
    build: Callable[[], nn.Module]
    input_size: tuple[int, int, int]
    batch: int
    classes: int


def workloads(device: str, quick: bool) -> list[Workload]:
    if device == "cuda":
        return [
            Workload(
                "resnet50 224px b64",
                lambda: torchvision.models.resnet50(num_classes=100),
                (3, 224, 224),
                64,
                100,
            ),
            Workload(
                "resnet20 32px b128",
                lambda: timm.create_model("cifar_resnet20"),
                (3, 32, 32),
                128,
                10,
            ),
        ]
    scale = 4 if quick else 1
    return [
        Workload(
            "resnet20 32px b128",
            lambda: timm.create_model("cifar_resnet20"),
            (3, 32, 32),
            128 // scale,
            10,
        ),
        Workload(
            "resnet50 128px b16",
            lambda: torchvision.models.resnet50(num_classes=100),
            (3, 128 // scale, 128 // scale),
            16,
            100,
        ),
    ]


def make(
    workload: Workload, variant: str, device: torch.device, trainable: bool = False
) -> nn.Module:
    torch.manual_seed(0)
    model = workload.build()
    if variant != "unwrapped":
        metaperturb.wrap(
            model,
            phi=metaperturb.Perturbation(),
            input_size=workload.input_size,
            trainable=trainable,
            memory_efficient=variant == "memory-efficient",
        )
        if variant == "reference":
            metaperturb.get_controller(model).site_function = reference_perturb
        if variant == "pytorch-ops":
            metaperturb.get_controller(model).site_function = functools.partial(
                perturb, fused=False
            )
        if variant == "triton":
            metaperturb.get_controller(model).site_function = functools.partial(
                perturb, triton=True
            )
        if variant == "torch-noise":
            metaperturb.get_controller(model).site_function = perturb_with_torch_noise
    return model.to(device)


def perturb_with_torch_noise(h: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The fused kernels fed ``torch.randn``'s noise (what they took before drawing their own):
    measures what drawing the noise inside the kernels gives."""
    if kwargs.get("training") or kwargs.get("eval_mode") == "sample":
        kwargs["noise"] = standard_normal_like(h)
    return perturb(h, *args, **kwargs)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step_fn(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: torch.dtype | None
) -> Callable[[], None]:
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=5e-4
    )
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(
            x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None
        ):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    return step


def eval_fn(model: nn.Module, x: torch.Tensor, autocast: torch.dtype | None) -> Callable[[], None]:
    model.eval()

    @torch.no_grad()
    def forward() -> None:
        with torch.autocast(
            x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None
        ):
            model(x)

    return forward


def interleaved(
    fns: dict[str, Callable[[], None]], device: torch.device, steps: int, repeats: int
) -> dict[str, float]:
    """Median over rounds of the per-round median step time, in seconds; rounds interleave."""
    for fn in fns.values():  # warm-up
        fn(), fn()
    rounds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times = []
            for _ in range(steps):
                synchronize(device)
                start = time.perf_counter()
                fn()
                synchronize(device)
                times.append(time.perf_counter() - start)
            rounds[name].append(statistics.median(times))
    return {name: statistics.median(values) for name, values in rounds.items()}


def saved_activation_bytes(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: torch.dtype | None
) -> int:
    """Bytes autograd keeps for backward in one training forward: the memory a step adds."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast(
            x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None
        ),
    ):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return sum(seen.values())


def setting(
    device: torch.device, autocast: torch.dtype | None, steps: int, repeats: int
) -> dict[str, object]:
    """What a report's figures were measured on and how."""
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "autocast": str(autocast),
        "steps": steps,
        "repeats": repeats,
    }


def peak_cuda_bytes(step: Callable[[], None]) -> int:
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=3, help="steps per round and configuration")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument(
        "--quick", action="store_true", help="small inputs, 1 round: checks the script runs"
    )
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the (slow) reference implementation"
    )
    parser.add_argument(
        "--channels-last", action="store_true", help="models and inputs in channels_last memory"
    )
    parser.add_argument("--no-triton", action="store_true", help="GPU: leave out the Triton site")
    args = parser.parse_args()
    device = torch.device(args.device)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    repeats, steps = (1, 1) if args.quick else (args.repeats, args.steps)
    variants = ["unwrapped", "fast"]
    if device.type == "cpu":
        variants.append("torch-noise")  # the fused kernels given torch.randn's noise
        variants.append("pytorch-ops")  # the fast path without the fused CPU kernels
    elif not args.no_triton:
        variants.append("triton")  # the sites as Triton kernels (phi frozen)
    variants += ["memory-efficient"] + ([] if args.no_reference else ["reference"])

    rows: list[dict[str, object]] = []
    for workload in workloads(device.type, args.quick):
        layout = torch.channels_last if args.channels_last else torch.contiguous_format
        x = torch.randn(workload.batch, *workload.input_size, device=device)
        x = x.contiguous(memory_format=layout)
        y = torch.randint(0, workload.classes, (workload.batch,), device=device)
        models = {v: make(workload, v, device).to(memory_format=layout) for v in variants}
        train = interleaved(
            {v: train_step_fn(m, x, y, autocast) for v, m in models.items()}, device, steps, repeats
        )
        evals = interleaved(
            {v: eval_fn(m, x, autocast) for v, m in models.items()}, device, steps, repeats
        )
        memory = {v: saved_activation_bytes(m, x, y, autocast) for v, m in models.items()}
        if device.type == "cuda":
            peaks = {
                v: peak_cuda_bytes(train_step_fn(m, x, y, autocast)) for v, m in models.items()
            }
        # phi's own meta-training step: trainable phi, gradients to phi and to the host.
        meta_models = {
            v: make(workload, v, device, trainable=True).to(memory_format=layout)
            for v in variants
            if v != "unwrapped"
        }
        meta = interleaved(
            {v: train_step_fn(m, x, y, autocast) for v, m in meta_models.items()},
            device,
            steps,
            repeats,
        )
        row: dict[str, object] = {
            "workload": workload.name,
            "train_s": train,
            "eval_s": evals,
            "saved_activation_bytes": memory,
            "meta_train_s": meta,
        }
        if device.type == "cuda":
            row["peak_cuda_bytes"] = peaks
        rows.append(row)
        # Each workload's rows as soon as they exist (a run stopped early keeps them).
        print(render({**setting(device, autocast, steps, repeats), "rows": [row]}), flush=True)

    report = {**setting(device, autocast, steps, repeats), "rows": rows}
    report["layout"] = "channels_last" if args.channels_last else "NCHW"
    RESULTS.mkdir(exist_ok=True)
    if not args.quick:
        suffix = "-cl" if args.channels_last else ""
        atomic_write(RESULTS / f"overhead-{device.type}{suffix}.json", json.dumps(report, indent=2))
    print(render(report))


def render(report: dict) -> str:
    title = (
        f"{report['device']}, {report['threads']} threads, torch {report['torch']}, "
        f"autocast {report['autocast']}, {report.get('layout', 'NCHW')}; medians of "
        f"{report['repeats']} interleaved rounds x "
        f"{report['steps']} steps"
    )
    variants = list(report["rows"][0]["train_s"])
    wrapped = [v for v in variants if v != "unwrapped"]
    lines = [
        title,
        "",
        "| workload | measure | "
        + " | ".join(variants)
        + " | "
        + " | ".join(f"{v} / unwrapped" for v in wrapped)
        + " |",
        "| --- | --- |" + " ---: |" * (len(variants) + len(wrapped)),
    ]
    for row in report["rows"]:
        for key, label, factor, unit in [
            ("train_s", "train step (fwd+bwd+Adam)", 1e3, "ms"),
            ("eval_s", "eval forward (expectation)", 1e3, "ms"),
            ("saved_activation_bytes", "activation memory kept for backward", 1e-6, "MB"),
            ("peak_cuda_bytes", "peak GPU memory of a train step", 1e-6, "MB"),
        ]:
            if key not in row:
                continue
            values = row[key]
            cells = [f"{values[v] * factor:.1f}" for v in variants]
            ratios = [f"{values[v] / values['unwrapped']:.2f}" for v in wrapped]
            lines.append(
                f"| {row['workload']} | {label} ({unit}) | {' | '.join(cells)} | {' | '.join(ratios)} |"
            )
    lines += [
        "",
        "| workload | meta-training step, trainable phi (ms): "
        + " | ".join(wrapped)
        + " | reference / fast |",
        "| --- |" + " ---: |" * (len(wrapped) + 1),
    ]
    for row in report["rows"]:
        meta = row["meta_train_s"]
        times = " | ".join(f"{meta[v] * 1e3:.1f}" for v in wrapped)
        speedup = f"{meta['reference'] / meta['fast']:.2f}x" if "reference" in meta else "-"
        lines.append(f"| {row['workload']} | {times} | {speedup} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
