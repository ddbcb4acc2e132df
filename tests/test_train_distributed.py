"""Meta-training under torchrun (gloo): one phi across ranks, nodes and restarts.

Each task's batches, noise and initialisation depend only on the seed, the task and the step, and
two ranks' gradients sum exactly as one process adds them, so a 2-task run gives the same phi,
bit for bit, in one process, on two ranks, on two "nodes", and after a crash and restart. The
loop itself checks at every logged step (here: every step) that the ranks hold the same phi.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metaperturb.train import TrainConfig, read_metrics, train

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = DATA / "tiny-imagenet-200-32px"

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.skipif(not TINY.is_dir(), reason=f"{TINY} not present"),
    pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed"),
]

ARGS = [
    "--data", str(TINY), "--classes", "4", "--max-per-class", "20", "--image-size", "16",
    "--num-tasks", "2", "--batch-size", "8", "--steps", "3", "--log-every", "1",
    "--checkpoint-every", "1", "--device", "cpu", "--threads", "1", "--no-progress",
]  # fmt: skip
TIMEOUT = 150


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _torchrun(*options: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *options, "-m", "metaperturb.train"]


def _phi(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 3
    return state["phi"]


def _check(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


@pytest.fixture(scope="module")
def single_process_phi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The phi of the same run in this process, without torch.distributed."""
    output = tmp_path_factory.mktemp("single")
    config = TrainConfig(
        data=str(TINY), classes=4, max_per_class=20, image_size=16, num_tasks=2, batch_size=8,
        steps=3, log_every=1, checkpoint_every=1, device="cpu", threads=1, progress=False,
        output_dir=str(output),
    )  # fmt: skip
    train(config)
    return _phi(output)


def test_two_ranks_with_a_crash_and_restart(
    tmp_path: Path, single_process_phi: dict[str, torch.Tensor]
) -> None:
    """torchrun --standalone --nproc-per-node 2 --max-restarts 1; rank 1 dies after step 2."""
    output = tmp_path / "run"
    command = _torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "1")
    result = subprocess.run(
        [*command, *ARGS, "--output-dir", str(output)],
        check=False,
        env=_env(_METAPERTURB_TEST_CRASH_AT_STEP="2"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    _check(result)
    assert "exiting on purpose" in result.stderr  # the first attempt did crash
    records = read_metrics(output / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["ranks"] == 2 for r in records)
    # Two launches (the crash's and the restart's), each with both ranks' machines.
    state = torch.load(output / "checkpoint.pt", map_location="cpu", weights_only=True)
    first, restart = state["segments"]
    assert first["from_step"] == 0 and first["to_step"] == restart["from_step"] > 0
    assert restart["to_step"] == 3
    assert [len(part["machines"]) for part in (first, restart)] == [2, 2]
    phi = _phi(output)
    for name, tensor in single_process_phi.items():
        assert torch.equal(phi[name], tensor), name


def test_two_nodes_with_c10d_rendezvous(
    tmp_path: Path, single_process_phi: dict[str, torch.Tensor]
) -> None:
    """Two torchrun agents on 127.0.0.1 (one process each) meeting through c10d."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    output = tmp_path / "run"
    command = _torchrun(
        "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "metaperturb-test",
    )  # fmt: skip
    nodes = [
        subprocess.Popen(
            [*command, *ARGS, "--output-dir", str(output)],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [node.communicate(timeout=TIMEOUT) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, (stdout, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, stdout[-4000:] + stderr[-4000:]
    assert all(r["ranks"] == 2 for r in read_metrics(output / "metrics.jsonl"))
    phi = _phi(output)
    for name, tensor in single_process_phi.items():
        assert torch.equal(phi[name], tensor), name
