"""Replay an evaluation run from one of its checkpoints and print where it ends up.

Whether two codes (or two machines) train the same network is a question of the weights, not of
the final accuracy: this script resumes a run's checkpoint (``.ckpt``, as the sweeps of
``benchmarks/transfer.py`` commit them), trains it ``--steps`` further, and prints the training
loss since its last curve point, the curve point it reached, if any, and a digest of the weights.
Run it twice, or once under each code (``PYTHONPATH=<a worktree>/src``), and compare the lines.

    python benchmarks/replay.py CHECKPOINT --steps 703

With ``--steps 0`` it only reads the checkpoint: where the run is, and phi's mean channel scale
s at each site from the sites' running statistics (``scales``), which tells whether a site that
closed early in the ramp is still closed, its test-accuracy curve so far, and its recorded
training seconds per step (``checkpoint_seconds_per_step``). Nothing is written beside the checkpoint: the replay
trains in a scratch folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from metaperturb._machine import FLUSH_DENORMAL_HELP, set_up_cpu
from metaperturb._serialization import fingerprint
from metaperturb.errors import FlushDenormalError
from metaperturb.transfer.run import TransferConfig, TransferRun


def replay(checkpoint: Path, steps: int, data_root: str | None) -> dict[str, object]:
    """Resume ``checkpoint`` in a scratch folder, train ``steps`` more, and describe the state."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    settings = json.loads(state["config"]) | {"device": "cpu"}
    if data_root is not None:
        settings["data_root"] = data_root
    with tempfile.TemporaryDirectory() as scratch:
        run = TransferRun(TransferConfig(**settings), Path(scratch))
        shutil.copy(checkpoint, run.checkpoint_path)
        run.maybe_resume()
        start = run.step
        recorded = run.train_seconds  # the run's own training time up to the checkpoint
        started = time.perf_counter()
        run.train(progress=False, until=start + steps)
        seconds = time.perf_counter() - started
        loss = run.loss_sum / run.loss_count if run.loss_count else None
        return {
            "run": run.id,
            "from_step": start,
            "to_step": run.step,
            "train_loss_since_last_curve_point": loss,
            # Test accuracy on the curve's subset at each curve step (a part-way run's so far).
            "curve": {point["step"]: point["test_accuracy"] for point in run.curve},
            "weights_sha256": fingerprint(run.model),
            # Wall time of the steps (one measurement, whatever else the machine runs).
            "train_seconds": seconds,
            # The run's training seconds per step up to the checkpoint, from its own record
            # (every segment, on whatever machine and beside whatever else ran it).
            "checkpoint_seconds_per_step": recorded / start if start else None,
            # phi's mean s per site (running statistics; None without phi).
            "scales": run.scales(),
            # The same code on another CPU (or thread count) takes another path: say which.
            "machine": run.machine,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument(
        "--steps", type=int, default=25, help="steps to train past the checkpoint (0: none)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the sweeps': 1)")
    parser.add_argument("--data-root", help="folder of the datasets, if not the run's")
    parser.add_argument(
        "--flush-denormal",
        action="store_true",
        help=FLUSH_DENORMAL_HELP,
    )
    args = parser.parse_args()
    try:
        set_up_cpu(args.threads, args.flush_denormal)
    except FlushDenormalError as error:
        raise SystemExit(f"--flush-denormal: {error}") from None
    print(json.dumps(replay(args.checkpoint, args.steps, args.data_root), indent=2))


if __name__ == "__main__":
    main()
