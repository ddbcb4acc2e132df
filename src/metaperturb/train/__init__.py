"""Meta-training of phi: ``train(TrainConfig(...))``, ``metaperturb train`` or
``python -m metaperturb.train``, in one process or under ``torchrun``.

Example:
    >>> from metaperturb.train import TrainConfig, train
    >>> config = TrainConfig(data="../shared/data/tiny-imagenet-200-32px", steps=750)
    >>> phi_dir = train(config)  # doctest: +SKIP
    >>> # metaperturb.wrap(model, phi=phi_dir)
"""

from __future__ import annotations

from ..errors import CheckpointError as CheckpointError
from ..errors import RunExistsError as RunExistsError
from .config import TrainConfig as TrainConfig
from .loop import train as train
from .metrics import read_metrics as read_metrics
from .plot import plot_metrics as plot_metrics
from .selection import SelectConfig as SelectConfig
from .selection import select as select

__all__ = [
    "CheckpointError",
    "RunExistsError",
    "SelectConfig",
    "TrainConfig",
    "plot_metrics",
    "read_metrics",
    "select",
    "train",
]
