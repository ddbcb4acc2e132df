"""benchmarks/replay.py answers "do these two codes train the same network?" by a digest of the
weights: it must give the same digest for the same replay and another one for another."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmark_scripts import load
from metaperturb.transfer import TransferConfig
from test_transfer import needs_mnist, stopped_at, tiny_target


@needs_mnist
def test_a_replay_is_the_same_network_twice_and_another_one_further_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = TransferConfig(
        target=tiny_target(), model="conv4", phi="default", steps=6, batch_size=8,
        curve_every=2, curve_images=4, checkpoint_every=2, eval_modes=False,
    )  # fmt: skip
    checkpoint = stopped_at(2, config, tmp_path, monkeypatch)

    saved = checkpoint.read_bytes()
    replay = load("replay").replay
    first, again = replay(checkpoint, 2, None), replay(checkpoint, 2, None)
    further = replay(checkpoint, 3, None)
    assert {k: v for k, v in first.items() if k != "train_seconds"} == {
        k: v for k, v in again.items() if k != "train_seconds"
    }
    assert first["train_seconds"] > 0
    assert (first["from_step"], first["to_step"], further["to_step"]) == (2, 4, 5)
    assert further["weights_sha256"] != first["weights_sha256"]
    assert checkpoint.read_bytes() == saved  # the replays trained elsewhere
    # --steps 0 reads the checkpoint as it is: its step, its weights, phi's s at every site.
    unchanged = replay(checkpoint, 0, None)
    assert (unchanged["from_step"], unchanged["to_step"]) == (2, 2)
    assert list(unchanged["curve"]) == [2] and list(first["curve"]) == [2, 4]  # the curve so far
    assert 0 <= unchanged["curve"][2] <= 1
    recorded = torch.load(checkpoint, weights_only=True)["train_seconds"]
    assert unchanged["checkpoint_seconds_per_step"] == pytest.approx(recorded / 2)
    assert unchanged["weights_sha256"] not in (first["weights_sha256"], further["weights_sha256"])
    scales = unchanged["scales"]
    assert scales is not None and len(scales) >= 4 and all(0 < s < 1 for s in scales.values())
