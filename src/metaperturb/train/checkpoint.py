"""One file per run, replaced atomically: a crash leaves the previous checkpoint intact.

The checkpoint holds everything a resumed run needs to continue as if never stopped: the step,
the config and task split, phi and its optimizer, every task network with its optimizer (the
sites' running statistics included), the RNG states, and which steps trained on which machines
(``segments``). It is written by rank 0 after gathering the task networks from every rank, so
resuming never needs a shared filesystem. It is read with ``weights_only=True``: no code is
unpickled from it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from .._atomic import atomic_write
from ..errors import CheckpointError

__all__ = [
    "CHECKPOINT_NAME",
    "FORMAT_VERSION",
    "CheckpointError",
    "load",
    "remove_temporaries",
    "save",
    "to_cpu",
]

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def to_cpu(value: Any) -> Any:
    """A copy of nested dicts / lists of tensors with every tensor on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(item) for item in value)
    return value


def save(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temporary file, fsync, ``os.replace``)."""
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **payload}, buffer)
    return atomic_write(path, buffer.getvalue())


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save`."""
    try:
        payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise CheckpointError(f"no checkpoint at {path}: nothing to resume.") from error
    except Exception as error:
        raise CheckpointError(
            f"{path} is not a readable metaperturb checkpoint ({type(error).__name__}: "
            f"{error}): it cannot be resumed; start a new --output-dir."
        ) from error
    version = payload.get("format_version") if isinstance(payload, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version!r}, this metaperturb reads {FORMAT_VERSION}: "
            "resume it with the metaperturb version that wrote it, or start a new --output-dir."
        )
    return payload


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the half-written temporary checkpoints a killed run left in ``folder``.

    Called by a resuming run, which owns the folder: each is as large as a checkpoint, and
    every crash mid-write would otherwise leave one more behind.
    """
    removed = sorted(folder.glob(f".{CHECKPOINT_NAME}.*.tmp"))
    for path in removed:
        path.unlink(missing_ok=True)
    return removed
