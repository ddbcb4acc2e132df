"""Atomic file writes: a temporary sibling, fsync, then ``os.replace``.

A crash or a full disk mid-write leaves the previous file intact and no partial file behind.
Every file metaperturb writes (phi folders, checkpoints, run files) goes through here.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

__all__ = ["atomic_write", "fsync_directory", "write_temporary"]

_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows only


def write_temporary(directory: Path, name: str, data: bytes) -> Path:
    """Write ``data`` to a new hidden sibling of ``directory / name`` and fsync it."""
    # os.open with mode 0o666 lets the umask decide the permissions, as for any new file.
    temporary = directory / f".{name}.{uuid.uuid4().hex}.tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def fsync_directory(directory: Path) -> None:
    """Make renames in ``directory`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    with contextlib.suppress(OSError):
        os.fsync(descriptor)
    os.close(descriptor)


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Replace ``path`` with ``data`` (text is written as UTF-8), all of it or nothing."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    temporary = write_temporary(target.parent, target.name, payload)
    try:
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)
    return target
