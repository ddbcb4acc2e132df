"""Every error metaperturb raises on purpose, each also a builtin a caller would catch."""

from __future__ import annotations

__all__ = [
    "AlreadyWrappedError",
    "DefaultPhiUnavailableError",
    "MetaPerturbError",
    "NoSitesError",
    "NotWrappedError",
    "PhiFormatError",
    "PhiNotFoundError",
    "SiteShapeError",
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


class PhiFormatError(MetaPerturbError, ValueError):
    """A phi file is not a valid metaperturb checkpoint (wrong, missing or extra tensors...)."""


class PhiNotFoundError(MetaPerturbError, FileNotFoundError):
    """No phi could be found at the given path, Hub repository or revision."""


class DefaultPhiUnavailableError(PhiNotFoundError):
    """The package carries no meta-trained phi* yet, so ``wrap(model)`` needs ``phi=``."""
