"""The evaluation report's README tables (benchmarks/transfer_readme.py): generated, never copied
by hand, so a wrong cell is a wrong result file, not a typo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmark_scripts import load
from metaperturb.transfer.config import closed_site_suffix

readme = load("transfer_readme")


def _run(method: str, target: str, accuracy: float, model: str = "cifar_resnet20") -> dict:
    return {
        "method": method,
        "target": target,
        "model": model,
        "accuracy": accuracy,
        "ece": 0.1,
        "evaluation": {},
    }


RESULTS = [
    _run("base", "s-cifar10", 0.70),
    _run("base", "s-cifar10", 0.68),
    _run("metaperturb[phi-star]", "s-cifar10", 0.72),
    _run("base", "mnist-10k", 0.99),
    _run("metaperturb[phi-star]", "mnist-10k", 0.98),
    _run("dropblock[0.05,5]", "s-cifar10", 0.71),
    _run("metaperturb[phi-star,pre-act]", "s-cifar10", 0.10),  # another placement: left out
]


def test_datasets_table_averages_seeds_leaves_missing_cells_empty_and_leads_over_base() -> None:
    rows = {line.split(" | ")[0].lstrip("| "): line for line in readme.datasets(RESULTS)[2:]}
    assert rows["Base"].split(" | ")[1:3] == ["69.00 +- 1.41 (2)", ""]
    phi = rows["MetaPerturb, phi\\* (shipped), as published"].rstrip(" |").split(" | ")
    # s-CIFAR10 +3.00 and MNIST-10k -1.00 over Base: +1.00 over 2 targets.
    assert phi[1] == "72.00 (1)" and phi[3] == "98.00 (1)" and phi[-1] == "+1.00 (2)"
    assert "DropBlock (rate 0.05, block size 5)" in rows
    assert "Manifold Mixup (tuned)" in rows  # planned, not run: an empty row, not a guess
    assert not any("10.00" in line for line in rows.values())


def test_the_late_closed_site_switch_gets_its_own_row_named_by_its_strength() -> None:
    late = _run("metaperturb[phi-star,exclude-closed-from0.5]", "s-cifar10", 0.74)
    ft = _run(
        "finetune[tiny-imagenet-resnet20]+metaperturb[phi-star,exclude-closed-from0.5]",
        "s-cifar10",
        0.75,
    )
    rows = {line.split(" | ")[0].lstrip("| "): line for line in readme.datasets([late, ft])[2:]}
    assert (
        rows["MetaPerturb, phi\\* switching off a site still closed at strength 0.5"].split(" | ")[
            1
        ]
        == "74.00 (1)"
    )
    label = "Fine-tuning + MetaPerturb (phi\\*, switching off a site still closed at strength 0.5)"
    assert rows[label].split(" | ")[1] == "75.00 (1)"
    # Before it has runs, the row is planned under the rule the grid queues.
    planned = {line.split(" | ")[0].lstrip("| ") for line in readme.datasets(RESULTS)[2:]}
    assert "MetaPerturb, phi\\* switching off a site still closed at strength 0.5" in planned


def test_the_summary_keeps_the_first_screens_rows_with_the_same_cells() -> None:
    summary = readme.summary(RESULTS)
    labels = [line.split(" | ")[0].lstrip("| ") for line in summary[2:]]
    assert labels == [
        "Base",
        "MetaPerturb, phi\\* (shipped), as published",
        "MetaPerturb, phi\\* switching off a site that closes (the library's default)",
        "MetaPerturb, the authors' phi (comparison only)",
    ]
    every_row = set(readme.datasets(RESULTS))
    assert set(summary) <= every_row  # the same header and cells, leads over Base included


def test_a_run_without_a_site_has_its_own_row_named_by_the_site() -> None:
    runs = [*RESULTS, _run("metaperturb[phi-star,without-stages.2.2]", "mnist-10k", 0.995)]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in readme.datasets(runs)[2:]}
    row = rows["MetaPerturb, phi\\* without the site at `stages.2.2`"].rstrip(" |").split(" | ")
    assert row[3] == "99.50 (1)" and row[-1] == "+0.50 (1)"
    assert rows["MetaPerturb, phi\\* (shipped), as published"].rstrip(" |").endswith("+1.00 (2)")
    assert "MetaPerturb, phi\\* without a closed site" in {
        line.split(" | ")[0].lstrip("| ") for line in readme.datasets(RESULTS)[2:]
    }


def _goal_rows(results: list[dict], build: Any = None) -> dict[str, list[str]]:
    """The goals table's cells by the goal's label."""
    return {
        line.split(" | ")[0].lstrip("| "): line.rstrip(" |").split(" | ")[1:]
        for line in (build or readme.goals)(results)[2:]
    }


def test_goals_table_measures_each_goal_on_the_targets_both_ran() -> None:
    rows = _goal_rows(RESULTS)
    base = rows["phi\\* ahead of Base on every target, by 2 points on average"]
    # +3.00 on s-CIFAR10 and -1.00 on MNIST-10k: +1.00 on average, short of 2 and not everywhere.
    assert base == ["+3.00", "", "-1.00", "", "+1.00 (2)", "no"]
    dropblock = rows["phi\\* ahead of DropBlock on average"]
    assert dropblock[0] == "+1.00" and dropblock[-1] == "so far (1 of 4 targets)"
    assert rows["fine-tuning + MetaPerturb ahead of fine-tuning"][-1] == "not run yet"
    # A second DropBlock setting scoring higher is the one phi* must beat.
    stronger = [*RESULTS, _run("dropblock[0.1,3]", "s-cifar10", 0.73)]
    rows = _goal_rows(stronger)
    assert rows["phi\\* ahead of DropBlock on average"][-2:] == ["-1.00 (1)", "no"]
    # Ahead by 2 on every target meets the first goal.
    ahead = [
        _run("base", "s-cifar10", 0.70),
        _run("metaperturb[phi-star]", "s-cifar10", 0.725),
        _run("base", "mnist-10k", 0.95),
        _run("metaperturb[phi-star]", "mnist-10k", 0.97),
    ]
    rows = _goal_rows(ahead)
    assert rows["phi\\* ahead of Base on every target, by 2 points on average"][-2:] == [
        "+2.25 (2)",
        "so far (2 of 4 targets)",
    ]
    # ... but not when one target falls behind, however far ahead the average is.
    behind = [
        _run("base", "s-cifar10", 0.70),
        _run("metaperturb[phi-star]", "s-cifar10", 0.80),
        _run("base", "omniglot-100", 0.90),
        _run("metaperturb[phi-star]", "omniglot-100", 0.899),
    ]
    base = _goal_rows(behind)["phi\\* ahead of Base on every target, by 2 points on average"]
    assert base[-3:] == ["-0.10", "+4.95 (2)", "no"]
    # The library's default (the closed-site switch) is measured on its own runs.
    switched = [*behind, _run("metaperturb[phi-star,exclude-closed]", "omniglot-100", 0.93)]
    rows = _goal_rows(switched)
    assert rows["the same with the closed-site switch (the library's default)"][-3:] == [
        "+3.00",
        "+3.00 (1)",
        "so far (1 of 4 targets)",
    ]
    assert rows["the same with the closed-site switch"][-1] == "not run yet"  # fine-tuning


def test_a_tie_is_level_but_not_ahead() -> None:
    runs = [
        _run("metaperturb[phi-star]", "s-cifar10", 0.70),
        _run("dropblock[0.05,5]", "s-cifar10", 0.70),
        _run("metaperturb[authors]", "s-cifar10", 0.70),
    ]
    rows = _goal_rows(runs)
    assert rows["phi\\* ahead of DropBlock on average"][-1] == "no"
    assert rows["phi\\* level with or ahead of the authors' phi on average"][-1].startswith(
        "so far"
    )


def test_goals_after_update_bn_score_every_network_that_recorded_it_and_only_those() -> None:
    def bn(run: dict, accuracy: float) -> dict:
        return run | {"evaluation": {"update_bn": {"accuracy": accuracy}}}

    runs = [
        bn(_run("base", "s-cifar10", 0.70), 0.71),
        bn(_run("metaperturb[phi-star]", "s-cifar10", 0.68), 0.74),
        _run("base", "mnist-10k", 0.99),  # no update_bn: left out
        bn(_run("metaperturb[phi-star]", "mnist-10k", 0.98), 0.99),
    ]
    row = _goal_rows(runs, readme.goals_after_update_bn)[
        "phi\\* ahead of Base on every target, by 2 points on average"
    ]
    assert row == ["+3.00", "", "", "", "+3.00 (1)", "so far (1 of 4 targets)"]


def test_architectures_table_shows_update_bn_and_the_other_placement_beside_phi_star() -> None:
    runs = [
        _run("base", "s-cifar10", 0.72, model="conv4"),
        _run("metaperturb[phi-star]", "s-cifar10", 0.66, model="conv4"),
        _run("metaperturb[phi-star,pre-act]", "s-cifar10", 0.64, model="conv4"),
    ]
    runs[0]["evaluation"] = {"update_bn": {"accuracy": 0.715}}
    runs[1]["evaluation"] = {"update_bn": {"accuracy": 0.73}}
    runs[2]["evaluation"] = {"update_bn": {"accuracy": 0.70}}
    rows = {line.split(" | ")[0].lstrip("| "): line for line in readme.architectures(runs)[2:]}
    assert rows["Conv4"].split(" | ")[1:] == [
        "72.00 (1)", "66.00 (1)", "-6.00", "71.50 (1)", "73.00 (1)", "64.00 (1)", "70.00 (1) |"
    ]  # fmt: skip
    assert rows["Conv6"].split(" | ")[1:] == ["", "", "", "", "", "", " |"]


def test_architectures_table_marks_cells_with_predictions_that_were_not_finite() -> None:
    """A NaN prediction counts as wrong: without a mark, 0.00 after update_bn would read as a
    network that learned nothing rather than one whose outputs were NaN."""
    runs = [_run("metaperturb[phi-star]", "s-cifar10", 0.7064, model="cifar_resnet44")]
    runs[0]["evaluation"] = {
        "default": {"accuracy": 0.7064, "nonfinite_predictions": 19},
        "update_bn": {"accuracy": 0.0, "nonfinite_predictions": 10000},
    }
    lines = readme.architectures(runs)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    cells = rows["ResNet-44"].split(" | ")[1:]
    assert cells[1] == "70.64 (1) (19 not finite)" and cells[4] == "0.00 (1) (10000 not finite)"
    assert "count as wrong" in lines[-1]
    clean = readme.architectures([_run("base", "s-cifar10", 0.7, model="cifar_resnet44")])
    assert not any("not finite" in line for line in clean)
    # Since update_bn refuses such statistics, the harness records a failure and no score;
    # the report reads results through `scored`, which leaves that evaluation out.
    runs[0]["evaluation"]["update_bn"] = {"failed": "not finite", "batches": 50}
    runs = [readme.scored(run) for run in runs]
    assert set(runs[0]["evaluation"]) == {"default"}
    rows = {line.split(" | ")[0].lstrip("| "): line for line in readme.architectures(runs)[2:]}
    assert rows["ResNet-44"].split(" | ")[5] == ""
    assert readme.goals_after_update_bn(runs)  # the run is left out, not a KeyError


def test_update_readme_rewrites_only_between_the_markers(tmp_path: Path) -> None:
    path = tmp_path / "README.md"
    text = (
        "intro\n<!-- results:architectures -->\nold table\n<!-- /results:architectures -->\nend\n"
    )
    path.write_text(text)
    assert readme.update_readme(path, RESULTS) == ["architectures"]
    once = path.read_text()
    assert once.startswith("intro\n<!-- results:architectures -->\n| s-CIFAR10")
    assert once.endswith("<!-- /results:architectures -->\nend\n") and "old table" not in once
    # Base, phi*, its lead; neither network's update_bn was recorded here.
    assert "| ResNet-20 | 69.00 +- 1.41 (2) | 72.00 (1) | +3.00 |  |  | 10.00 (1) |  |" in once
    readme.update_readme(path, RESULTS)
    assert path.read_text() == once  # idempotent


def test_a_block_without_its_closing_marker_is_refused_and_the_file_kept(tmp_path: Path) -> None:
    path = tmp_path / "README.md"
    text = "intro\n<!-- results:datasets -->\nthe rest of the README\n"
    path.write_text(text)
    with pytest.raises(SystemExit, match="no <!-- /results:datasets -->"):
        readme.update_readme(path, RESULTS)
    assert path.read_text() == text


def test_the_figures_numbers_are_tabled_seeds_averaged_targets_in_preset_order() -> None:
    load("transfer_plots")  # transfer_report imports it by name
    report = load("transfer_report")

    def curved(method: str, target: str, seed_offset: float, scales: list[float]) -> dict:
        run = _run(method, target, 0.7)
        run["curve"] = [
            {"step": 1000, "test_accuracy": 0.50 + seed_offset},
            {"step": 2000, "test_accuracy": 0.60 + seed_offset},
        ]
        run["scales"] = {f"block{i}": s for i, s in enumerate(scales)}
        return run

    runs = [
        curved("metaperturb[phi-star]", "mnist-10k", 0.0, [0.5, 0.4]),
        curved("metaperturb[phi-star]", "s-cifar10", 0.0, [0.5, 0.2]),
        curved("metaperturb[phi-star]", "s-cifar10", 0.1, [0.3, 0.2]),
        curved("base", "s-cifar10", 0.05, []),
        curved("metaperturb[phi-star]", "s-cifar10", 0.3, [0.9, 0.9]) | {"model": "conv4"},
    ]
    curves = report.curves_table(runs)
    assert curves[0] == "| target | method (seeds) | 1,000 | 2,000 |"
    assert curves[2:] == [
        "| s-cifar10 | base (1) | 55.00 | 65.00 |",
        "| s-cifar10 | metaperturb[phi-star] (2) | 55.00 | 65.00 |",  # conv4 left out
        "| mnist-10k | metaperturb[phi-star] (1) | 50.00 | 60.00 |",
    ]
    scales = report.scales_table(runs)
    assert scales[4:6] == [
        "| s-cifar10 (2) | 0.400 | 0.200 |",
        "| mnist-10k (1) | 0.500 | 0.400 |",
    ]
    assert "- s-cifar10 vs mnist-10k: at most 0.200 apart" in scales


def test_the_calibration_table_shows_the_mean_confidence_weighted_by_each_bins_count() -> None:
    load("transfer_plots")  # transfer_report imports it by name
    report = load("transfer_report")
    run = _run("mixup[2]", "mnist-10k", 0.98)
    run["evaluation"] = {
        "default": {
            "reliability": [
                {"lower": 0.0, "upper": 0.5, "count": 0, "confidence": None, "accuracy": None},
                {"lower": 0.5, "upper": 0.9, "count": 3, "confidence": 0.8, "accuracy": 1.0},
                {"lower": 0.9, "upper": 1.0, "count": 1, "confidence": 0.96, "accuracy": 1.0},
            ]
        }
    }
    # (3 x 0.80 + 1 x 0.96) / 4 = 0.84: below the accuracy, so underconfident.
    assert report.calibration_table([run])[2] == (
        "| mnist-10k | mixup[2] | 98.00 (1) | 84.00 (1) | 10.00 (1) |"
    )


def test_runs_without_sites_are_drawn_in_their_own_colour_other_placements_are_not() -> None:
    plots = load("transfer_plots")
    kept = _run("metaperturb[phi-star,without-stages.2.2]", "omniglot-100", 0.9)
    assert plots.plotted(kept)
    assert plots.COLOURS[plots._family(kept["method"])] != plots.COLOURS["metaperturb[phi-star]"]
    assert not plots.plotted(_run("metaperturb[phi-star,pre-act]", "s-cifar10", 0.7))


def test_the_switched_off_table_lists_each_guarded_run_with_its_sites_and_steps() -> None:
    load("transfer_plots")
    report = load("transfer_report")
    guarded = "metaperturb[phi-star,exclude-closed]"
    runs = [
        _run(guarded, "omniglot-100", 0.912)
        | {
            "seed": 1,
            "config": {"on_closed_site": "exclude"},
            "excluded_sites": {"stages.2.2": 300},
        },
        _run(guarded, "s-cifar10", 0.71)
        | {"seed": 0, "config": {"on_closed_site": "exclude"}, "excluded_sites": {}},
        _run("metaperturb[phi-star]", "omniglot-100", 0.67) | {"seed": 0, "config": {}},
    ]
    assert report.switched_off_table(runs)[2:] == [
        f"| s-cifar10 | cifar_resnet20, {guarded} | 0 | none | 71.00 |",
        f"| omniglot-100 | cifar_resnet20, {guarded} | 1 | `stages.2.2` at step 300 | 91.20 |",
    ]
    assert report.switched_off_table(runs[2:]) == []
    assert load("transfer_plots").plotted(runs[0])


def test_a_run_in_which_no_site_closed_fills_both_closed_site_rows_once() -> None:
    """Such a run trained the network of either ``on_closed_site`` setting; one in which a site
    closed is its own setting's alone, a run made under the other setting is not doubled, and a
    name the report gave the run (phi* for a candidate) stays."""

    def phi_star(target: str, seed: int, accuracy: float, setting: str, closed: Any) -> dict:
        config = {"target": target, "phi": "default", "phi_name": "phi-star-seed-1", "seed": seed}
        config["on_closed_site"] = setting
        suffix = ",exclude-closed" if setting == "exclude" else ""
        run = _run(f"metaperturb[phi-star{suffix}]", target, accuracy)
        run_id = f"{target}__cifar_resnet20__{run['method']}__10000steps__seed{seed}"
        return run | {"seed": seed, "config": config, "closed_sites": closed, "id": run_id}

    runs = [
        phi_star("s-cifar10", 0, 0.71, "warn", {}),
        phi_star("s-cifar10", 1, 0.72, "warn", {}),
        phi_star("s-cifar10", 1, 0.73, "exclude", {}),  # made under its own setting as well
        phi_star("omniglot-100", 0, 0.67, "warn", {"stages.2.2": 300}),
        phi_star("omniglot-100", 0, 0.91, "exclude", {"stages.2.2": 300}),
        _run("base", "s-cifar10", 0.70) | {"seed": 0},
    ]
    cells = {
        (r["target"], r["method"], r["seed"]): r["accuracy"]
        for r in readme.with_closed_site_twins(runs)
    }
    assert cells == {
        ("s-cifar10", "metaperturb[phi-star]", 0): 0.71,
        ("s-cifar10", "metaperturb[phi-star]", 1): 0.72,
        ("s-cifar10", "metaperturb[phi-star,exclude-closed]", 0): 0.71,
        ("s-cifar10", "metaperturb[phi-star,exclude-closed]", 1): 0.73,
        ("omniglot-100", "metaperturb[phi-star]", 0): 0.67,
        ("omniglot-100", "metaperturb[phi-star,exclude-closed]", 0): 0.91,
        ("s-cifar10", "base", 0): 0.70,
    }
    twin = readme.with_closed_site_twins(runs)[-1]  # seed 0's, on s-CIFAR10
    assert twin["id"] == (
        "s-cifar10__cifar_resnet20__metaperturb[phi-star,exclude-closed]__10000steps__seed0"
    )
    assert (
        twin["config"]["on_closed_site"] == "exclude"
        and runs[0]["config"]["on_closed_site"] == "warn"
    )
    rows = _goal_rows(runs)
    assert rows["the same with the closed-site switch (the library's default)"][0] == "+2.00"
    # A run without a site has its twin too, which is no row of its own.
    trimmed = phi_star("s-cifar10", 0, 0.69, "warn", {})
    trimmed["method"] = "metaperturb[phi-star,without-stages.2.2]"
    trimmed["config"]["exclude"] = ["stages.2.2"]
    labels = [line.split(" | ")[0].lstrip("| ") for line in readme.datasets([trimmed])[2:]]
    assert "MetaPerturb, phi\\* without the site at `stages.2.2`" in labels
    assert not any("exclude-closed" in label for label in labels)


def test_a_run_counts_for_a_waiting_closed_site_rule_where_it_trained_its_network() -> None:
    """Twins are made for the settings some run has (here the half-strength rule): a run in
    which no site closed fills its row, and a half-strength run that switched nothing off
    fills the as-published row; a run in which a site closed fills neither."""

    def run(
        seed: int, accuracy: float, setting: str, waits: float, closed: dict, off: dict
    ) -> dict:
        suffix = closed_site_suffix(setting, waits)
        config = {"phi": "default", "on_closed_site": setting, "exclude_closed_from": waits}
        made = _run(f"metaperturb[phi-star{suffix}]", "s-cifar10", accuracy)
        return made | {
            "seed": seed,
            "config": config,
            "closed_sites": closed,
            "excluded_sites": off,
        }

    runs = [
        run(0, 0.71, "warn", 0.0, {}, {}),
        run(1, 0.72, "exclude", 0.5, {"stages.2.2": 200}, {}),  # reopened before half strength
        run(2, 0.66, "warn", 0.0, {"stages.2.2": 200}, {}),
        run(2, 0.69, "exclude", 0.5, {"stages.2.2": 200}, {"stages.2.2": 2000}),
    ]
    cells = {(r["method"], r["seed"]) for r in readme.with_closed_site_twins(runs)}
    assert cells == {
        ("metaperturb[phi-star]", 0),
        ("metaperturb[phi-star,exclude-closed]", 0),
        ("metaperturb[phi-star,exclude-closed-from0.5]", 0),
        ("metaperturb[phi-star,exclude-closed-from0.5]", 1),
        ("metaperturb[phi-star]", 1),
        ("metaperturb[phi-star]", 2),
        ("metaperturb[phi-star,exclude-closed-from0.5]", 2),
    }


def test_the_machines_table_lists_each_part_and_counts_the_runs_before_the_record() -> None:
    load("transfer_plots")
    report = load("transfer_report")
    xeon = {"cpu": "Xeon", "cpu_capability": "AVX512", "threads": 1, "torch": "2.14.1"}
    recorded = _run("base", "s-cifar10", 0.7) | {
        "seed": 0,
        "segments": [
            {"from_step": 0, "to_step": 2000, "machine": None},
            {"from_step": 2000, "to_step": 10000, "machine": xeon},
        ],
    }
    older = [_run("base", "mnist-10k", 0.98) | {"seed": s, "resumed": s == 1} for s in (0, 1)]
    lines = report.machines_table([recorded, *older])
    assert lines[2] == (
        "| s-cifar10 | cifar_resnet20, base | 0 | 0-2,000: not recorded; "
        "2,000-10,000: Xeon (AVX512), 1 thread, torch 2.14.1 |"
    )
    assert lines[-1].startswith("2 runs finished before") and "1 of them were resumed" in lines[-1]
    assert report.machines_table([recorded])[-1] == lines[2]  # nothing to count


def test_every_runs_eval_modes_name_the_network() -> None:
    """Two networks' runs of one target and method (ResNet-20's and WRN-28-2's phi* seed 0)
    must not read as the same run twice."""
    load("transfer_plots")  # transfer_report imports it by name
    report = load("transfer_report")
    runs = []
    for model, accuracy in (("cifar_resnet20", 0.69), ("cifar_wrn_28_2", 0.72)):
        run = _run("metaperturb[phi-star]", "s-cifar10", accuracy, model=model)
        run["seed"] = 0
        run["evaluation"] = {"sample": {"accuracy": accuracy, "ece": 0.2, "seconds": 1.0}}
        runs.append(run)
    lines = report.modes_table(runs)
    assert lines[0].startswith("| target | network | method | seed | eval mode |")
    assert [line.split(" | ")[1] for line in lines[2:]] == ["cifar_resnet20", "cifar_wrn_28_2"]
