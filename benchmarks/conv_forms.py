"""Which form of phi's shared-kernel convolutions is fastest on this device, and what
``torch.compile`` changes: the measurement behind ``metaperturb.phi.DEFAULT_CONV_FORMS``.

phi runs its 3x3 kernels over every channel on its own. That can be one depthwise convolution
(``groups=C``), one single-channel convolution over the (B*C, 1, H, W) view ("batched"), or for
the four scale kernels one grouped convolution with 4 outputs per channel; all compute the same
function (``tests/test_fast_path.py``). Backends differ a lot: on a GPU PyTorch's own NCHW
depthwise kernel took 40% of the wrapped ResNet-50 step (``results/profile-cuda-resnet50.txt``),
while a batched convolution goes to cuDNN; on a CPU the batched form was several times slower.
Every configuration is timed interleaved in one process, medians of ``--repeats`` rounds, as in
``benchmarks/overhead.py``; each wrapped row is divided by the unwrapped row (compiled rows by
the compiled unwrapped model).

Usage:
    python benchmarks/conv_forms.py --device cuda             # writes results/conv-forms-cuda.*
    python benchmarks/conv_forms.py --device cuda --compile   # also torch.compile'd models
    python benchmarks/conv_forms.py --quick                   # a smoke run on the CPU
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch
from overhead import RESULTS, eval_fn, interleaved, make, setting, train_step_fn, workloads
from torch import nn

import metaperturb
from metaperturb._atomic import atomic_write
from metaperturb.phi import ConvForm

FORMS: list[tuple[ConvForm, ConvForm]] = [
    ("depthwise", "grouped"),
    ("depthwise", "depthwise"),
    ("batched", "grouped"),
    ("batched", "batched"),
]


def with_forms(model: nn.Module, forms: tuple[ConvForm, ConvForm]) -> nn.Module:
    metaperturb.get_controller(model).phi.conv_forms = forms
    return model


def label(forms: tuple[ConvForm, ConvForm]) -> str:
    return f"noise {forms[0]}, scale {forms[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also torch.compile'd models")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    repeats, steps = (1, 1) if args.quick else (args.repeats, args.steps)

    rows = []
    for workload in workloads(device.type, args.quick):
        x = torch.randn(workload.batch, *workload.input_size, device=device)
        y = torch.randint(0, workload.classes, (workload.batch,), device=device)
        # nn.Modules, and torch.compile's wrappers of them (typed as plain callables).
        models: dict[str, Any] = {"unwrapped": make(workload, "unwrapped", device)}
        meta_models: dict[str, nn.Module] = {}
        for forms in FORMS:
            models[label(forms)] = with_forms(make(workload, "fast", device), forms)
            meta_models[label(forms)] = with_forms(
                make(workload, "fast", device, trainable=True), forms
            )
        if args.compile:
            # Compiled separately from the eager copies: a compiled module shares its parameters.
            models["unwrapped, compiled"] = torch.compile(make(workload, "unwrapped", device))
            models["default forms, compiled"] = torch.compile(make(workload, "fast", device))
        train: dict[str, Callable[[], None]] = {
            name: train_step_fn(model, x, y, autocast) for name, model in models.items()
        }
        evals = {name: eval_fn(model, x, autocast) for name, model in models.items()}
        meta = {name: train_step_fn(model, x, y, autocast) for name, model in meta_models.items()}
        rows.append(
            {
                "workload": workload.name,
                "train_s": interleaved(train, device, steps, repeats),
                "eval_s": interleaved(evals, device, steps, repeats),
                "meta_train_s": interleaved(meta, device, steps, repeats),
            }
        )
        print(render_rows(rows[-1:]), flush=True)

    report = {**setting(device, autocast, steps, repeats), "rows": rows}
    header = (
        f"{report['device']}, {report['threads']} threads, torch {report['torch']}, autocast "
        f"{report['autocast']}; medians of {repeats} interleaved rounds x {steps} steps"
    )
    table = header + "\n\n" + render_rows(rows)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        atomic_write(RESULTS / f"conv-forms-{device.type}.json", json.dumps(report, indent=1))
        atomic_write(RESULTS / f"conv-forms-{device.type}.md", table + "\n")
    print(table)


def render_rows(rows: list[dict]) -> str:
    columns = "train (ms) | / unwrapped | eval (ms) | / unwrapped | trainable-phi step (ms)"
    lines = [
        f"| workload | configuration | {columns} |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        for name, seconds in row["train_s"].items():
            base = "unwrapped, compiled" if name.endswith("compiled") else "unwrapped"
            meta = row["meta_train_s"].get(name)
            lines.append(
                f"| {row['workload']} | {name} | {seconds * 1e3:.1f} | "
                f"{seconds / row['train_s'][base]:.2f} | {row['eval_s'][name] * 1e3:.1f} | "
                f"{row['eval_s'][name] / row['eval_s'][base]:.2f} | "
                + ("" if meta is None else f"{meta * 1e3:.1f}")
                + " |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
