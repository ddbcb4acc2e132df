"""benchmarks/update_bn.py --variance on a network the grid kept: why update_bn helps it."""

from __future__ import annotations

import math
from pathlib import Path

from torch import nn

import metaperturb
from benchmark_scripts import load
from test_eval_overflow import kept_network
from test_transfer import needs_mnist


@needs_mnist
def test_variance_table_of_a_kept_network_leaves_out_dead_channels(tmp_path: Path) -> None:
    eval_overflow = load("eval_overflow")  # first: update_bn.py imports it by name
    update_bn_script = load("update_bn")
    _, _, weights = kept_network(tmp_path / "runs")
    run = eval_overflow.restore(weights, tmp_path)
    norms = [(n, m) for n, m in run.model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    name, dead = norms[-1]
    assert dead.running_var is not None
    dead.running_var[:2] = 0.0  # two channels that never varied in training

    lines = update_bn_script.variance_table(run).splitlines()
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in lines[4:]}
    assert list(rows) == [n for n, _ in norms]
    sample, expectation, left_out = rows[name]
    assert left_out == f"2 of {dead.num_features} |"
    # The other channels still give a ratio: no NaN from 0 / 0 or inf from x / 0.
    for ratios in rows.values():
        assert all(math.isfinite(float(r)) for r in ratios[:2]), ratios
    assert math.isfinite(float(sample)) and math.isfinite(float(expectation))
    # Base has no phi, so no eval modes: both columns are its one plain forward (the control).
    metaperturb.unwrap(run.model)
    plain = update_bn_script.variance_table(run).splitlines()[4:]
    assert all(line.split(" | ")[1] == line.split(" | ")[2] for line in plain)
