"""What one value costs in the fused CPU site kernels, by map shape: whether they are bound by
their arithmetic or by the cache (a map larger than the cache against the same channels in
small maps that fit it).

    python benchmarks/site_kernels.py      # writes results/site-kernels-cpu.md

Times the sampled site (forward, and backward with phi frozen) of ``metaperturb._native`` in
NCHW, medians of ``--repeats`` calls, in nanoseconds per feature value.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from overhead import RESULTS

from metaperturb import _native
from metaperturb._atomic import atomic_write

#: ResNet-50's stages at 128px, batch 16 (the overhead benchmark's CPU workload), each beside
#: the same channels in 8x8 or 4x4 maps with as many values.
SHAPES = [
    (16, 256, 32, 32),
    (256, 256, 8, 8),
    (16, 512, 16, 16),
    (64, 512, 8, 8),
    (16, 1024, 8, 8),
    (16, 2048, 4, 4),
    (128, 16, 32, 32),
]


def per_value(shape: tuple[int, int, int, int], repeats: int) -> tuple[float, float]:
    weights = torch.randn(36) * 0.3
    h = torch.rand(*shape, requires_grad=True)
    scale, strength = torch.rand(shape[1]), torch.tensor(1.0)
    forward, backward = [], []
    for _ in range(repeats + 2):  # the first two warm up
        start = time.perf_counter()
        out = _native.sampled(h, weights, scale, strength, 100.0)
        middle = time.perf_counter()
        out.backward(torch.ones_like(out))
        forward.append(middle - start)
        backward.append(time.perf_counter() - middle)
    return (
        statistics.median(forward[2:]) / h.numel() * 1e9,
        statistics.median(backward[2:]) / h.numel() * 1e9,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not _native.available():
        raise SystemExit("the fused CPU kernels did not build here; nothing to time")
    lines = [
        (
            f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}; medians "
            f"of {args.repeats} calls. Command: python benchmarks/site_kernels.py"
        ),
        "",
        "| map (B, C, H, W), NCHW | image KiB | forward ns/value | backward ns/value |",
        "| --- | ---: | ---: | ---: |",
    ]
    for shape in SHAPES:
        forward, backward = per_value(shape, args.repeats)
        kib = shape[1] * shape[2] * shape[3] * 4 / 1024
        lines.append(f"| {shape} | {kib:.0f} | {forward:.2f} | {backward:.2f} |")
        print(lines[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    atomic_write(RESULTS / "site-kernels-cpu.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
