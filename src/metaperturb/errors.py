"""Every error metaperturb raises on purpose, each also a builtin a caller would catch."""

from __future__ import annotations

__all__ = [
    "AlreadyWrappedError",
    "CheckpointError",
    "DataError",
    "DefaultPhiUnavailableError",
    "FlushDenormalError",
    "HubCacheError",
    "LaunchError",
    "MetaPerturbError",
    "ModelChangedError",
    "NoSitesError",
    "NotWrappedError",
    "PhiFormatError",
    "PhiNotFoundError",
    "RunExistsError",
    "RunInProgressError",
    "SiteDtypeError",
    "SiteShapeError",
    "SplitError",
    "TrainingStoppedError",
]


class MetaPerturbError(Exception):
    """Base class of the errors raised by metaperturb."""


class NoSitesError(MetaPerturbError, ValueError):
    """The model has no module after which phi can be applied."""


class AlreadyWrappedError(MetaPerturbError, RuntimeError):
    """``wrap`` was called on a model that already carries MetaPerturb sites."""


class NotWrappedError(MetaPerturbError, ValueError):
    """An operation needs a wrapped model and got a plain one."""


class SiteShapeError(MetaPerturbError, RuntimeError):
    """A site received a tensor it was not planned for (the model changed after ``wrap``)."""


class SiteDtypeError(MetaPerturbError, TypeError):
    """A site received a tensor that is not floating point (phi perturbs feature maps)."""


class ModelChangedError(MetaPerturbError, RuntimeError):
    """A site module was replaced after ``wrap``, so its site would silently stop firing."""


class FlushDenormalError(MetaPerturbError, RuntimeError):
    """Denormal floats cannot be flushed to zero on every CPU thread (no SSE3, or torch's
    threads started before the mode was set)."""


class HubCacheError(MetaPerturbError, PermissionError):
    """A phi not yet in the Hub cache cannot be downloaded because the cache is not writable."""


class PhiFormatError(MetaPerturbError, ValueError):
    """A phi file is not a valid metaperturb checkpoint (wrong, missing or extra tensors...)."""


class PhiNotFoundError(MetaPerturbError, FileNotFoundError):
    """No phi could be found at the given path, Hub repository or revision."""


class DefaultPhiUnavailableError(PhiNotFoundError):
    """The package carries no meta-trained phi* yet, so ``wrap(model)`` needs ``phi=``."""


class DataError(MetaPerturbError, ValueError):
    """A dataset could not be found, read, or turned into labelled images."""


class RunExistsError(MetaPerturbError, FileExistsError):
    """The output folder already holds a run and ``resume`` was not asked for."""


class RunInProgressError(MetaPerturbError, RuntimeError):
    """Another live process is running the same evaluation run (its lock file exists)."""


class CheckpointError(MetaPerturbError, ValueError):
    """A checkpoint is missing, unreadable, or belongs to a different run."""


class LaunchError(MetaPerturbError, ValueError):
    """The processes started cannot run this meta-training (more processes than tasks)."""


class SplitError(MetaPerturbError, ValueError):
    """The dataset cannot make the requested task split (too few classes or images)."""


class TrainingStoppedError(MetaPerturbError, RuntimeError):
    """Training stopped part-way (a meta-training rank died, a write failed, SIGTERM, an
    evaluation run asked to stop); says how to resume."""

    def __init__(self, message: str, *, asked: bool = False) -> None:
        super().__init__(message)
        #: True when the run stopped because a stop was asked (a signal to this process or to
        #: another rank), with the step it was at checkpointed; False for a failure.
        self.asked = asked
