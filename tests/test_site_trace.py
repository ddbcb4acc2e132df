"""benchmarks/site_trace.py: it records what phi sees at each site, and changes nothing it traces."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmark_scripts import load
from metaperturb.errors import TrainingStoppedError
from metaperturb.transfer import TransferConfig, TransferRun
from test_transfer import needs_mnist, tiny_target

pytestmark = needs_mnist


def _site_trace() -> Any:
    return load("site_trace")


def _run(folder: Path, stop: threading.Event) -> TransferRun:
    folder.mkdir()
    config = TransferConfig(
        target=tiny_target(),
        model="conv4",
        phi="default",
        steps=20,
        batch_size=8,
        curve_every=0,
        checkpoint_every=0,
        eval_modes=False,
    )
    return TransferRun(config, folder, stop=stop)


def test_the_trace_records_every_site_at_its_steps_and_leaves_training_as_it_was(
    tmp_path: Path,
) -> None:
    stop = threading.Event()
    traced = _run(tmp_path / "traced", stop)
    tracer = _site_trace().SiteTracer(traced, every=5, until=12, stop=stop)
    with pytest.raises(TrainingStoppedError):
        traced.train(progress=False)
    assert traced.step == 12
    assert [r["step"] for r in tracer.records] == [5, 10]
    first, second = (r["strength"] for r in tracer.records)
    assert 0 < first < second <= 1  # ramped over the first 40% of the 20 steps
    for record in tracer.records:
        assert set(record["sites"]) == set(tracer.controller.site_names)
        for site in record["sites"].values():
            assert 0 <= site["s_min"] <= site["s_mean"] <= 1
            assert site["rms"] > 0 and site["maps_var"] >= 0
        assert record["logit_spread"] > 0

    untraced_stop = threading.Event()
    untraced = _run(tmp_path / "untraced", untraced_stop)
    untraced.config.steps = 12
    untraced.train(progress=False)
    expected = untraced.model.state_dict()
    for name, value in traced.model.state_dict().items():
        assert torch.equal(value, expected[name]), f"{name} differs: the trace changed it"


def test_the_table_quotes_the_records_nearest_the_steps_asked(tmp_path: Path) -> None:
    import json

    trace = tmp_path / "run.trace.jsonl"
    records = [
        {
            "step": step,
            "strength": step / 40,
            "logit_spread": 1.0,
            "sites": {"a": {"s_mean": step / 100, "rms": 2.0}, "b": {"s_mean": 0.5, "rms": 3.0}},
        }
        for step in (10, 20, 30)
    ]
    trace.write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = _site_trace().trace_table(trace, [12, 30], key="s_mean").splitlines()
    assert lines[0] == "| step | strength | logit spread | s_mean a | s_mean b |"
    assert lines[2:] == [
        "| 10 | 0.250 | 1.000 | 0.100 | 0.500 |",
        "| 30 | 0.750 | 1.000 | 0.300 | 0.500 |",
    ]
    assert "| 3.000 |" in _site_trace().trace_table(trace, [20], key="rms")
