"""``examples/ddp.py`` under ``torchrun`` with two processes (gloo): the replicas end as one
network, and the example's layout keeps DDP's gradient-layout warning away."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "ddp.py"
TINY = ["--epochs", "1", "--limit", "128", "--batch-size", "64", "--threads", "1"]

pytest.importorskip("datasets", reason="the example loads its data with Hugging Face datasets")


def _run(*launcher: str) -> str:
    done = subprocess.run(
        [*launcher, str(EXAMPLE), *TINY],
        cwd=EXAMPLE.parent,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed
    return printed


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_train_one_network_and_print_its_accuracy() -> None:
    printed = _run(
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"
    )
    assert "replicas identical: yes (2 processes)" in printed
    match = re.search(r"MetaPerturb: test accuracy (\d+\.\d+)% on 128 images", printed)
    assert match and 0.0 <= float(match[1]) <= 100.0, printed
    # The network in channels_last like its batches: 1x1 convolutions' gradients fit DDP's buckets.
    assert "bucket view" not in printed


@pytest.mark.slow
def test_without_torchrun_it_trains_in_one_process() -> None:
    printed = _run(sys.executable)
    assert "replicas identical: yes (1 process)" in printed
    assert "MetaPerturb: test accuracy" in printed
