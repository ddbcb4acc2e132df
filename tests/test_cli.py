"""The ``metaperturb`` command line."""

from __future__ import annotations

import pytest

from metaperturb.cli import main


def test_inspect_prints_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "cifar_resnet20", "--input-size", "3", "32", "32"]) == 0
    out = capsys.readouterr().out
    assert "9 sites" in out and "stages.2.2" in out and "stem" in out


def test_inspect_torchvision_stage_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["inspect", "tv:resnet18", "--input-size", "3", "64", "64", "--sites", "stage"]) == 0
    )
    assert "4 sites" in capsys.readouterr().out


def test_inspect_before_activation(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["inspect", "cifar_resnet20", "--input-size", "3", "32", "32"]
    assert main([*args, "--placement", "before_activation"]) == 0
    out = capsys.readouterr().out
    assert "placement 'before_activation'" in out and "stages.2.2.act2" in out


def test_inspect_exclude(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["inspect", "cifar_resnet20", "--input-size", "3", "32", "32"]
    assert main([*args, "--exclude", "stages.2.2"]) == 0
    out = capsys.readouterr().out
    assert "8 sites" in out and "left out (exclude=): stages.2.2" in out


def test_unknown_model_is_a_clear_error() -> None:
    with pytest.raises(SystemExit, match="timm knows no model"):
        main(["inspect", "no_such_net"])
