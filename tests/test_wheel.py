"""The wheel: it carries the package and the weights folder, and finds phi* once installed."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_CHECK_INSTALLED = """
import sys
from pathlib import Path

import metaperturb.hub as hub
from metaperturb.errors import DefaultPhiUnavailableError

site = Path(sys.argv[1]).resolve()
package = Path(hub.__file__).resolve().parent
assert package.is_relative_to(site), f"imported {package}, not the installed wheel in {site}"
path = hub.default_phi_path().resolve()
assert path == package / "weights" / "phi-star", path
try:
    hub.load_default_phi()
except DefaultPhiUnavailableError as error:
    assert "phi=" in str(error)
    print("unavailable")
else:
    print("loaded")
"""


def _run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_wheel_ships_weights_folder_and_finds_phi_star(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    _run(
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--disable-pip-version-check",
        "-w",
        str(dist),
        str(REPO),
        cwd=tmp_path,
    )
    (wheel,) = dist.glob("metaperturb-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("__init__.py", "phi.py", "errors.py", "hub.py", "convert.py", "_version.py"):
        assert f"metaperturb/{module}" in names
    assert "metaperturb/weights/README.md" in names
    assert not [name for name in names if name.endswith((".pth", ".pt", ".ckpt"))]
    if "metaperturb/weights/phi-star/model.safetensors" in names:
        assert "metaperturb/weights/phi-star/README.md" in names, "phi* ships with its card"

    site = tmp_path / "site"
    _run(
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-compile",
        "--disable-pip-version-check",
        "--target",
        str(site),
        str(wheel),
        cwd=tmp_path,
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    outcome = _run("-c", _CHECK_INSTALLED, str(site), cwd=tmp_path, env=env).strip()
    shipped = (REPO / "weights" / "phi-star" / "model.safetensors").is_file()
    assert outcome == ("loaded" if shipped else "unavailable")
