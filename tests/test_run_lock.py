"""One process per evaluation run: the lock beside its result."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from metaperturb._run_lock import lock_holder, run_lock
from metaperturb.errors import RunInProgressError


def _finished_pid() -> int:
    """The pid of a process that has exited (so no live process owns it for a moment)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_lock_is_held_for_the_block_and_then_removed(tmp_path: Path) -> None:
    lock = tmp_path / "run.lock"
    with run_lock(lock):
        owner = json.loads(lock.read_text())
        assert owner["host"] == socket.gethostname() and isinstance(owner["pid"], int)
    assert not lock.exists()


def test_the_lock_is_removed_when_the_run_fails(tmp_path: Path) -> None:
    lock = tmp_path / "run.lock"
    with pytest.raises(ZeroDivisionError), run_lock(lock):
        1 / 0  # noqa: B018
    assert not lock.exists()


def test_a_lock_held_by_a_live_process_is_refused_and_left_alone(tmp_path: Path) -> None:
    lock = tmp_path / "s-cifar10__base__seed0.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        content = json.dumps({"host": socket.gethostname(), "pid": holder.pid})
        lock.write_text(content)
        refused = pytest.raises(RunInProgressError, match=rf"pid {holder.pid} .*delete the lock")
        with refused, run_lock(lock):
            pytest.fail("entered a run another process holds")
        assert lock.read_text() == content
        assert lock_holder(lock) == f"pid {holder.pid} on {socket.gethostname()}"
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _finished_pid()}))
    assert lock_holder(lock) is None
    with run_lock(lock):
        assert json.loads(lock.read_text())["pid"] != _finished_pid()
    assert not lock.exists()


def test_a_lock_from_another_host_is_trusted(tmp_path: Path) -> None:
    """Its pid means nothing here, so it cannot be judged stale."""
    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps({"host": "another-" + socket.gethostname(), "pid": 1}))
    with pytest.raises(RunInProgressError, match="another-"), run_lock(lock):
        pass
    assert lock.exists()
