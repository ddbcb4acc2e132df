"""Run something in another train/eval mode and give every module its own mode back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["preserved_modes"]


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore each submodule's ``training`` flag on exit, not just the model's: a host may keep
    some layers in eval mode while training (a frozen BatchNorm), which ``model.train()`` would
    switch back."""
    modes = {module: module.training for module in model.modules()}
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
