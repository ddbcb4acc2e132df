"""Print the README's compatibility matrix: every model of tests/test_compat_matrix.py, wrapped.

Usage: python benchmarks/compat_matrix.py > benchmarks/results/compat_matrix.md
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_cases() -> list:
    spec = importlib.util.spec_from_file_location(
        "compat", ROOT / "tests" / "test_compat_matrix.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["compat"] = module
    spec.loader.exec_module(module)
    return [(case, module.exercise) for case in module.CASES]


def main() -> None:
    print(
        f"torch {torch.__version__}; planned at the input size shown; each model also trains "
        "one step (batch 2, CPU) and evaluates once\n"
    )
    print("| library | model | input | sites | first site | last site |")
    print("| --- | --- | --- | ---: | --- | --- |")
    for case, exercise in load_cases():
        _, plan = exercise(case)
        first, last = plan.sites[0], plan.sites[-1]
        print(
            f"| {case.library} | `{case.name}` | {case.channels}x{case.size}x{case.size} | "
            f"{len(plan.sites)} | `{first.name}` ({first.module_type}) | `{last.name}` "
            f"({last.module_type}) |"
        )


if __name__ == "__main__":
    main()
