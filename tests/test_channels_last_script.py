"""benchmarks/channels_last.py on another of the harness's networks (``--model``): the layout
choice is measured for each network the grids train, not only ResNet-20."""

from __future__ import annotations

import sys

import pytest

from benchmark_scripts import load


def test_model_option_times_that_network_in_both_layouts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    load("overhead")  # first: channels_last.py imports it by name
    script = load("channels_last")
    argv = ["channels_last.py", "--quick", "--model", "cifar_mobilenetv2_100"]
    monkeypatch.setattr(sys, "argv", argv)
    script.main()
    lines = capsys.readouterr().out.splitlines()
    assert "cifar_mobilenetv2_100 32px" in lines[0] and "resnet20" not in lines[0]
    if sys.platform != "win32":  # the process's own CPU account of the timing rounds
        assert "s system CPU time in this process" in lines[1]
    table = [line for line in lines if line.startswith("| ") and "---" not in line]
    rows = [line.split(" | ") for line in table[1:]]
    assert [row[1] for row in rows] == [
        "Base",
        "MetaPerturb",
        "Base",
        "MetaPerturb, expectation",
        "MetaPerturb, one sample",
    ]
    assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in rows)
