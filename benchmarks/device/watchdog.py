"""Beside a device sweep: when the runs cannot all finish before the call's limit, stop the
lower-priority ones (their checkpoints stay and travel back) so that the others can.

    python benchmarks/device/watchdog.py SECONDS RESULTS_DIR PATTERN...

At 45% of SECONDS after the sweep started (``/tmp/sweep-start``), each run's rate is read from
its checkpoint (step, file time). If the slowest run whose id matches none of the PATTERNs would
not finish (plus a minute of evaluation) in time, the shards running a matching id that would
not finish either are stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

EVALUATION_SECONDS = 60.0


def main() -> None:
    seconds, results, patterns = float(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    marker = Path("/tmp/sweep-start")
    while not marker.exists():
        time.sleep(1)
    start = marker.stat().st_mtime
    time.sleep(max(0.0, start + 0.45 * seconds - time.time()))
    projections = {}
    for checkpoint in results.glob("*.ckpt"):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        config_steps = int(checkpoint.stem.split("__")[-2].removesuffix("steps"))
        rate = state["step"] / max(1.0, checkpoint.stat().st_mtime - start)
        projections[checkpoint.stem] = (
            start + config_steps / rate + EVALUATION_SECONDS - time.time()
        )
        print(f"watchdog: {checkpoint.stem} step {state['step']}, {rate:.1f} steps/s", flush=True)
    kept = [p for name, p in projections.items() if not any(x in name for x in patterns)]
    left = start + seconds - time.time()
    slowest = max(kept) if kept else float("inf")
    print(f"watchdog: {left:.0f} s left; the kept runs need up to {slowest:.0f} s", flush=True)
    if slowest > left:
        for shard in range(8):
            log = Path(f"/tmp/shard-{shard}.log")
            running = (
                [
                    line.split()[-1]
                    for line in log.read_text().splitlines()
                    if line.startswith("running ")
                ]
                if log.exists()
                else []
            )
            if not running or not any(x in running[-1] for x in patterns):
                continue
            if projections.get(running[-1], float("inf")) <= left:
                continue  # it finishes in time anyway
            print(f"watchdog: stopping shard {shard} so the others can finish", flush=True)
            subprocess.run(["pkill", "-TERM", "-f", "--", f"--shard {shard}/8"], check=False)


if __name__ == "__main__":
    os.nice(5)
    main()
