"""benchmarks/save_runs.sh: what a session leaves of its stopped evaluation runs on main."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "save_runs.sh"
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


#: git commits in a bare test environment need a name; the script needs our Python.
ENV = {
    **os.environ,
    **dict.fromkeys(("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"), "test"),
    **dict.fromkeys(("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"), "test@example.com"),
    "PYTHON": sys.executable,
    "MIN_STEPS": "200",
}


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=repo, env=ENV, capture_output=True, text=True, check=True
    )
    return done.stdout


def save_runs(repo: Path) -> str:
    """Run the repo's copy of the script; its standard output."""
    command = ["bash", str(repo / "benchmarks" / "save_runs.sh")]
    done = subprocess.run(
        command, env=ENV, capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@needs_git
def test_checkpoints_are_committed_and_those_of_a_few_steps_dropped(tmp_path: Path) -> None:
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(SCRIPT, tmp_path / "benchmarks" / "save_runs.sh")
    results = tmp_path / "benchmarks" / "results" / "transfer"
    results.mkdir(parents=True)
    (results / "done.json").write_text("{}\n")  # a finished run's result: not this script's
    for name, step in (("early", 150), ("late", 4500)):
        torch.save({"step": step, "model": {}}, results / f"{name}.ckpt")
    (tmp_path / ".gitignore").write_text("*.ckpt\n")  # as in the project: only -f adds them
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".gitignore", "benchmarks/save_runs.sh")
    git(tmp_path, "commit", "-q", "-m", "start")

    output = save_runs(tmp_path)
    assert "dropped early.ckpt: step 150 < 200" in output
    assert not (results / "early.ckpt").exists()
    committed = git(tmp_path, "show", "--name-only", "--format=%s", "HEAD").splitlines()
    assert committed[0].startswith("State of the evaluation runs stopped part-way")
    assert committed[1:] == ["", "benchmarks/results/transfer/late.ckpt"]
    assert "done.json" in git(tmp_path, "status", "--porcelain")  # left for its own commit

    # The run finished since: its checkpoint is gone, and the next save commits the deletion.
    (results / "late.ckpt").unlink()
    save_runs(tmp_path)
    assert git(tmp_path, "ls-files", "benchmarks/results") == ""
    assert "no evaluation checkpoint changed" in save_runs(tmp_path)
