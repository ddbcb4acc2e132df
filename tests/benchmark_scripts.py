"""Import a script of ``benchmarks/`` (not a package) by name, for the tests that pin its logic."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str) -> Any:
    """``benchmarks/<name>.py`` as a module, registered under ``name`` so that the scripts that
    import each other by name (transfer_report imports transfer_plots) find it."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
