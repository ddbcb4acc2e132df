"""One process per run: a lock file beside the run's result, so sweeps can run side by side.

Two processes of the evaluation sweep (or a sweep and a ``metaperturb eval`` by hand) that pick
the same pending run would both train it and overwrite each other's checkpoints. The first one
creates ``<run id>.lock`` (``O_EXCL``, so exactly one wins) with its host and pid; the others
see a live owner and move on. A lock left by a process that died (same host, pid gone) is taken
over; a lock from another host is trusted, since its pid cannot be checked from here.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from .errors import RunInProgressError

__all__ = ["lock_holder", "run_lock"]


def _owner() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read(path: Path) -> dict[str, object] | None:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _stale(owner: dict[str, object] | None) -> bool:
    """A lock whose owner is known to be gone; an unreadable one is left to its writer."""
    if owner is None:
        return False
    pid = owner.get("pid")
    return owner.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)


def _create(path: Path) -> bool:
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as stream:
        stream.write(json.dumps(_owner()) + "\n")
    return True


def _describe(owner: dict[str, object]) -> str:
    return f"pid {owner.get('pid')} on {owner.get('host')}"


def lock_holder(path: str | os.PathLike[str]) -> str | None:
    """Who holds the lock at ``path`` ("pid P on HOST"), or None when nobody live does."""
    owner = _read(Path(path))
    if owner is None or _stale(owner):
        return None
    return _describe(owner)


@contextlib.contextmanager
def run_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``path`` as this process's lock for the duration; raise if a live process holds it."""
    lock = Path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    if not _create(lock):
        owner = _read(lock)
        if _stale(owner):
            lock.unlink(missing_ok=True)  # two takers race here; O_EXCL below picks one
        if not _stale(owner) or not _create(lock):
            owner = _read(lock) or owner
            holder = _describe(owner) if owner else "a process"
            raise RunInProgressError(
                f"{lock.stem} is being run by {holder} (lock file {lock}). Run something else, "
                "or delete the lock file if that process is gone."
            )
    try:
        yield
    finally:
        if _read(lock) == _owner():
            lock.unlink(missing_ok=True)
