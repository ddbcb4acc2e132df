"""benchmarks/eval_overflow.py scores a kept network both ways, with and without the clamp."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch.nn.functional as F

from benchmark_scripts import load
from metaperturb.transfer import TransferConfig, run_id, run_transfer
from test_transfer import needs_mnist, tiny_target


def kept_network(folder: Path) -> tuple[TransferConfig, dict[str, Any], Path]:
    """A 3-step Conv4 run with phi* that kept its weights: its config, result and weights."""
    config = TransferConfig(
        target=tiny_target(),
        model="conv4",
        phi="default",
        phi_name="phi-star",
        steps=3,
        batch_size=8,
        curve_every=0,
        eval_modes=False,
        save_weights=True,
    )
    result = run_transfer(config, folder, progress=False)
    return config, result, folder / f"{run_id(config)}.safetensors"


@needs_mnist
def test_a_kept_network_is_scored_as_its_run_scored_it(tmp_path: Path) -> None:
    eval_overflow = load("eval_overflow")
    config, result, weights = kept_network(tmp_path / "runs")
    # The kept network is the trained one: scored as the run scored it, the same NLL (a fresh
    # network would give another).
    run = eval_overflow.restore(weights, tmp_path / "scratch")
    probabilities = run.predict()
    nll = F.nll_loss(probabilities.clamp_min(1e-12).log(), run.test_data.labels).item()
    assert nll == pytest.approx(result["evaluation"]["default"]["nll"], rel=1e-5)
    assert run.step == 3
    row, _ = eval_overflow.examine(weights, 12)
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:3] == [run_id(config), "3", "12"]
    # With the clamp (the library's default, as the run was scored), the same accuracy.
    assert cells[5] == f"{100 * result['accuracy']:.2f}"
