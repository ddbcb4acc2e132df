"""The quickstart (the README's first command) runs end to end, wrapped and as a baseline.

Runs ``examples/quickstart.py``'s ``main`` in-process on a handful of the bundled images, so a
broken example or a broken public API path it uses (wrap with its fallback, inspect,
StrengthScheduler, update_bn, set_eval_mode) fails here rather than in a new user's first minute.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "examples" / "quickstart.py"
DATA = REPO / "examples" / "data" / "fashion-mnist-small"
TINY = ["--epochs", "1", "--limit", "64", "--batch-size", "32", "--seed", "1"]

pytest.importorskip("datasets", reason="the quickstart loads its data with Hugging Face datasets")


@pytest.fixture(scope="module")
def quickstart() -> ModuleType:
    spec = importlib.util.spec_from_file_location("metaperturb_quickstart", QUICKSTART)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _accuracy(printed: str) -> float:
    match = re.search(r"test accuracy (\d+(?:\.\d+)?)%", printed)
    assert match, f"no test accuracy in the output:\n{printed}"
    return float(match.group(1))


def test_bundled_data_is_there() -> None:
    assert (DATA / "train.parquet").is_file()
    assert (DATA / "test.parquet").is_file()


def test_wrapped_run_prints_accuracy(
    quickstart: ModuleType, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import metaperturb

    calls: list[int] = []
    real = metaperturb.update_bn

    def counting_update_bn(loader: Any, model: Any, *args: Any, **kwargs: Any) -> None:
        batches = list(loader)
        calls.append(len(batches))
        real(batches, model, *args, **kwargs)

    monkeypatch.setattr(metaperturb, "update_bn", counting_update_bn)
    result = quickstart.main(TINY)
    printed = capsys.readouterr().out
    assert calls == [2]  # after training, over the (64 images / 32 a batch) training batches
    assert result.wrapped
    assert 0.0 <= _accuracy(printed) <= 100.0
    assert _accuracy(printed) == pytest.approx(result.test_accuracy, abs=0.01)
    assert "MetaPerturb plan for CifarResNet" in printed  # metaperturb.inspect was printed
    assert "9 sites" in printed
    # No claim about the method from a 1-epoch run, only a pointer to the evaluation.
    assert "Evaluation" in printed


def test_baseline_does_not_wrap(quickstart: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    threads = torch.get_num_threads()
    try:
        result = quickstart.main([*TINY, "--baseline", "--threads", "1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)  # do not slow down the tests that run after this one
    printed = capsys.readouterr().out
    assert not result.wrapped
    assert 0.0 <= _accuracy(printed) <= 100.0
    assert "MetaPerturb plan" not in printed
    assert "baseline" in printed


def test_augment_keeps_shape_and_content(quickstart: ModuleType) -> None:
    import torch

    images = torch.arange(2 * 28 * 28, dtype=torch.float32).reshape(2, 1, 28, 28)
    out = quickstart.augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    # Every pixel is either padding (0) or one of the image's own pixels.
    assert set(out[0].unique().tolist()) <= set(images[0].unique().tolist()) | {0.0}


def test_help_explains_every_flag(
    quickstart: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        quickstart.parse_args(["--help"])
    printed = capsys.readouterr().out
    for flag in ("--baseline", "--epochs", "--seed", "--batch-size", "--data", "--threads"):
        assert flag in printed
    assert "--limit" not in printed  # a test-only flag
