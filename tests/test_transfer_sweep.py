"""The sweep script's listing (benchmarks/transfer.py --list): what a session reads to plan which
runs to resume."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from benchmark_scripts import load
from metaperturb._run_lock import run_lock
from metaperturb.transfer import TransferConfig, run_id


def test_a_pending_run_with_a_checkpoint_is_listed_with_the_step_it_resumes_from(
    tmp_path: Path,
) -> None:
    sweep = load("transfer")
    config = TransferConfig(target="s-cifar10", seed=3)
    assert sweep.run_state(config, tmp_path, done=False) == "pending"
    torch.save({"step": 2250, "model": {}}, tmp_path / f"{run_id(config)}.ckpt")
    assert sweep.run_state(config, tmp_path, done=False) == "pending (checkpoint at step 2,250)"
    assert sweep.run_state(config, tmp_path, done=True) == "done   "
    # A running run (its lock held by a live process, here this one) says how far it has saved.
    with run_lock(tmp_path / f"{run_id(config)}.lock"):
        state = sweep.run_state(config, tmp_path, done=False)
    assert state.startswith(f"running (pid {os.getpid()} on ")
    assert state.endswith(", checkpoint at step 2,250)")
