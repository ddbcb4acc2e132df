"""Meta-training throughput: task-steps per second for 1 and 2 processes and several T.

A task-step is one task's train batch plus its held-out batch (two forward and backward passes
through a wrapped network), so a run of S steps with T tasks does S * T task-steps. Each
configuration is a real ``metaperturb train`` run (one process, or ``torchrun
--nproc-per-node 2``) on a Tiny ImageNet slice; the rate is read from its metrics log, leaving out
the first ``--warmup`` steps. Every configuration uses all the cores it is given: one process
with ``--threads`` threads, or two processes with half as many each. Also measured: the data
pipeline alone (one augmented, normalised batch from the uint8 tensor), to show it is not the
bottleneck.

Usage:
    python benchmarks/meta_train_throughput.py                 # the README table (CPU)
    python benchmarks/meta_train_throughput.py --tasks 2 --steps 4 --batch-size 8   # a smoke run
Writes a markdown table to stdout and JSON to benchmarks/results/meta_train_throughput-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from metaperturb._atomic import atomic_write
from metaperturb.train import read_metrics
from metaperturb.train.sampling import TaskStream

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet-200-32px"


def run(
    processes: int, tasks: int, args: argparse.Namespace, folder: Path
) -> dict[str, float | int]:
    """One meta-training run; its task-steps per second after the warm-up steps."""
    threads = max(1, args.threads // processes)
    output = folder / f"p{processes}-t{tasks}"
    flags = [
        "--data", str(args.data), "--classes", str(args.classes), "--max-per-class",
        str(args.max_per_class), "--num-tasks", str(tasks), "--batch-size", str(args.batch_size),
        "--steps", str(args.steps), "--log-every", "1", "--checkpoint-every", "0",
        "--threads", str(threads), "--device", args.device, "--no-progress",
        "--output-dir", str(output),
    ]  # fmt: skip
    if processes == 1:
        command = [sys.executable, "-m", "metaperturb.train", *flags]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command = [*launcher, "--nproc-per-node", str(processes), "-m", "metaperturb.train"]
        command += flags
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    records = read_metrics(output / "metrics.jsonl")
    timed = [r for r in records if r["step"] > args.warmup]
    seconds = sum(1.0 / r["steps_per_s"] for r in timed)
    steps_per_s = len(timed) / seconds
    return {
        "processes": processes,
        "threads_per_process": threads,
        "tasks": tasks,
        "steps_per_s": steps_per_s,
        "task_steps_per_s": steps_per_s * tasks,
        "wall_s": wall,
    }


def data_pipeline(batch_size: int, image_size: int, repeats: int = 50) -> float:
    """Milliseconds for one augmented, normalised batch from a 100,000-image uint8 tensor."""
    torch.set_num_threads(1)
    images = torch.randint(0, 256, (100_000, 3, image_size, image_size), dtype=torch.uint8)
    labels = torch.randint(0, 40, (100_000,))
    stream = TaskStream(
        images, labels, range(0, 100_000, 10), batch_size, (0, 0, 0),
        padding=4, flip=True, mean=[0.5] * 3, std=[0.25] * 3,
    )  # fmt: skip
    stream.batch(0)
    start = time.perf_counter()
    for step in range(repeats):
        stream.batch(step)
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DATA), help="source dataset (Tiny ImageNet 32px)")
    parser.add_argument("--classes", type=int, default=40, help="classes of the slice")
    parser.add_argument("--max-per-class", type=int, default=50, help="images per class")
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4], help="values of T")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (paper: 128)")
    parser.add_argument("--steps", type=int, default=6, help="meta-training steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores in all")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="metaperturb-throughput-") as folder:
        for tasks in args.tasks:
            for processes in args.processes:
                if processes <= tasks:
                    rows.append(run(processes, tasks, args, Path(folder)))
    pipeline_ms = data_pipeline(args.batch_size, 32)
    pipeline_128_ms = data_pipeline(128, 32)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}; cifar_resnet20 at 32 px, batch {args.batch_size}, "
        f"{args.steps} steps ({args.warmup} left out); load average at the end {load:.1f}"
    )
    print(header, "\n")
    print("| processes x threads | T | steps/s | task-steps/s | wall (s) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['processes']} x {row['threads_per_process']} | {row['tasks']} | "
            f"{row['steps_per_s']:.3f} | {row['task_steps_per_s']:.3f} | {row['wall_s']:.0f} |"
        )
    print(
        f"\nData pipeline alone (1 thread): {pipeline_ms:.1f} ms per batch of {args.batch_size}, "
        f"{pipeline_128_ms:.1f} ms per batch of 128."
    )
    RESULTS.mkdir(exist_ok=True)
    target = RESULTS / f"meta_train_throughput-{args.device}.json"
    summary = {
        "header": header,
        "rows": rows,
        "data_pipeline_ms": {str(args.batch_size): pipeline_ms, "128": pipeline_128_ms},
        "median_task_steps_per_s": statistics.median(r["task_steps_per_s"] for r in rows),
        "args": vars(args),
    }
    atomic_write(target, json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
