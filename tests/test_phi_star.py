"""benchmarks/phi_star.py: the model card's "Reproduce" commands are the ones that made the
selection it reports, and ``select`` passes its settings on to ``metaperturb select``."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path
from typing import Any

import pytest

from benchmark_scripts import load
from metaperturb import Perturbation

phi_star = load("phi_star")


def _report(
    names: list[str], steps: int, tasks: int, models: list[str] | None = None, **config: Any
) -> dict:
    """A selection report; ``models`` names the tasks' networks (reports before 2026-12-07 name
    none: every task's was ResNet-20)."""
    return {
        "scores": dict.fromkeys(names, 0.5),
        "tasks": [
            {"label": f"task-{k}", **({"model": models[k]} if models else {})} for k in range(tasks)
        ],
        "config": {"steps": steps, "seeds": 1, **config},
    }


def test_the_first_selection_reproduces_with_its_own_settings_not_todays_defaults() -> None:
    """phi*'s selection: seeds 0 and 1 on block outputs, seed 0 before the last ReLU, one
    2,000-step meta-test on CIFAR-10, no closed-site screen (reports of then lack the key)."""
    report = _report(
        ["runs/phi-star/seed-1", "runs/phi-star/preact-seed-0", "runs/phi-star/seed-0"],
        steps=2000,
        tasks=1,
    )
    assert phi_star.reproduce_commands(report) == [
        "python benchmarks/phi_star.py train --seeds 0 1",
        "python benchmarks/phi_star.py train --seeds 0 --placement before_activation",
        (
            "python benchmarks/phi_star.py select --steps 2000 --no-many-class "
            "--no-pre-activation-task --no-screen-closed-sites"
        ),
        "python benchmarks/phi_star.py install",
    ]


@pytest.mark.parametrize("placement", ["output", "before_activation"])
def test_a_run_folder_name_reads_back_as_its_seed_and_placement(placement: str) -> None:
    """``train`` names the folders, ``reproduce_commands`` reads them: one spelling for both."""
    name = phi_star._run_name(3, placement)
    assert phi_star._parse_run_name(name) == (3, placement)
    assert phi_star._parse_run_name("selection") is None


def test_a_selection_with_the_defaults_names_its_runs_and_the_full_schedule() -> None:
    """The installed phi* competing is no run to meta-train; two seeds a candidate is said."""
    report = _report(
        ["runs/phi-star/seed-4", "runs/phi-star/seed-2", "weights/phi-star"],
        steps=10_000,
        tasks=3,
        models=["cifar_resnet20", "cifar_resnet20", "cifar_wrn_28_2"],
        screen_closed_sites=True,
    )
    report["config"]["seeds"] = 2
    assert phi_star.reproduce_commands(report) == [
        "python benchmarks/phi_star.py train --seeds 2 4",
        "python benchmarks/phi_star.py select --steps 10000 --seeds 2",
        "python benchmarks/phi_star.py install",
    ]
    # Two tasks on ResNet-20 alone: a selection of the day before the pre-activation task.
    report = _report(["runs/phi-star/seed-0"], steps=10_000, tasks=2, screen_closed_sites=True)
    assert phi_star.reproduce_commands(report)[1] == (
        "python benchmarks/phi_star.py select --steps 10000 --no-pre-activation-task"
    )


@pytest.mark.parametrize(
    ("flags", "passed", "not_passed"),
    [
        ([], ["--extra-task", "model=cifar_wrn_28_2", "classes=100"], ["--no-screen-closed-sites"]),
        (
            ["--no-many-class", "--no-screen-closed-sites"],
            ["--no-screen-closed-sites", "model=cifar_wrn_28_2"],
            ["classes=100"],
        ),
        (["--no-many-class", "--no-pre-activation-task"], [], ["--extra-task"]),
    ],
)
def test_select_passes_its_settings_to_metaperturb_select(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    passed: list[str],
    not_passed: list[str],
) -> None:
    Perturbation().save_pretrained(tmp_path / "seed-0" / "phi")
    commands: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda command, check: commands.append(command))
    monkeypatch.setattr(
        "sys.argv", ["phi_star.py", "--runs-dir", str(tmp_path), "select", "--steps", "7", *flags]
    )
    phi_star.main()
    (command,) = commands
    assert command[command.index("--steps") + 1] == "7"
    assert str(tmp_path / "seed-0") in command
    assert all(flag in command for flag in passed)
    assert not any(flag in command for flag in not_passed)


def test_select_without_finished_runs_says_to_train_first(tmp_path: Path) -> None:
    args = argparse.Namespace(runs_dir=tmp_path)
    with pytest.raises(SystemExit, match="run `train` first"):
        phi_star.select(args)
