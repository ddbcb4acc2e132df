"""Keep a wrapped ``nn.Sequential`` a sequence of its own layers.

``wrap`` stores its state as a child module, and an ``nn.Sequential`` treats every child as one of
its layers: ``len(model)``, ``model[-1]``, slicing, ``model[-1] = new_head`` and ``del model[i]``
would all see (or replace) the MetaPerturb module. So a wrapped Sequential gets a subclass whose
sequence methods run with that child set aside, the way ``torch.nn.utils.parametrize`` swaps in a
subclass for a parametrized module; ``unwrap`` puts the original class back. ``state_dict``,
``.to()``, ``deepcopy`` and pickling still see the child. The subclass pickles as the original
class plus a swap on load, so a saved model never names a class that exists only at run time.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from torch import nn

__all__ = ["adopt", "release"]

_CLASSES: dict[type[nn.Sequential], type[nn.Sequential]] = {}


class _HostSequence(nn.Sequential):
    """Mixin for a wrapped ``nn.Sequential``: the sequence API skips the state child.

    Reads (``len``, iteration, indexing, the forward) filter the child out without touching
    ``_modules``, so they stay traceable by ``torch.compile``; edits run with it set aside.
    """

    _metaperturb_attribute: str
    _metaperturb_base: type[nn.Sequential]

    def _layers(self) -> OrderedDict[str, nn.Module]:
        skip = self._metaperturb_attribute
        return OrderedDict((k, m) for k, m in self._modules.items() if k != skip and m is not None)

    @contextlib.contextmanager
    def _state_set_aside(self) -> Iterator[None]:
        name = self._metaperturb_attribute
        state = self._modules.pop(name, None)
        try:
            yield
        finally:
            if state is not None:
                self._modules[name] = state

    def __len__(self) -> int:
        return len(self._layers())

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._layers().values())

    def __getitem__(self, idx: Any) -> Any:
        layers = self._layers()
        if isinstance(idx, slice):  # a slice is a plain sequence of layers, not a wrapped host
            return nn.Sequential(OrderedDict(list(layers.items())[idx]))
        return self._get_item_by_idx(iter(layers.values()), idx)

    def __add__(self, other: Any) -> nn.Sequential:
        return nn.Sequential(*self) + other

    def __mul__(self, other: int) -> nn.Sequential:
        return nn.Sequential(*self) * other

    __rmul__ = __mul__

    def __setitem__(self, idx: int, module: nn.Module) -> None:
        with self._state_set_aside():
            super().__setitem__(idx, module)

    def __delitem__(self, idx: int | slice) -> None:
        with self._state_set_aside():
            super().__delitem__(idx)

    def __iadd__(self, other: Any) -> Any:
        with self._state_set_aside():
            return super().__iadd__(other)

    def __imul__(self, other: int) -> Any:
        with self._state_set_aside():
            return super().__imul__(other)

    def pop(self, key: int | slice) -> nn.Module:
        with self._state_set_aside():
            return super().pop(key)

    def append(self, module: nn.Module) -> Any:
        with self._state_set_aside():
            return super().append(module)

    def insert(self, index: int, module: nn.Module) -> Any:
        with self._state_set_aside():
            return super().insert(index, module)

    def extend(self, sequential: Any) -> Any:
        with self._state_set_aside():
            return super().extend(sequential)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (
            _restore,
            (self._metaperturb_base, self._metaperturb_attribute, self.__getstate__()),
        )


def _host_class(base: type[nn.Sequential], attribute: str) -> type[nn.Sequential]:
    if base not in _CLASSES:
        _CLASSES[base] = type(
            base.__name__,
            (_HostSequence, base),
            {
                "__module__": base.__module__,
                "__qualname__": base.__qualname__,
                "_metaperturb_attribute": attribute,
                "_metaperturb_base": base,
            },
        )
    return _CLASSES[base]


def _restore(base: type[nn.Sequential], attribute: str, state: dict[str, Any]) -> nn.Sequential:
    model = base.__new__(base)
    model.__setstate__(state)
    model.__class__ = _host_class(base, attribute)
    return model


def adopt(model: nn.Module, attribute: str) -> None:
    """Give a Sequential host the subclass that hides ``attribute`` from its sequence methods."""
    if isinstance(model, nn.Sequential) and not isinstance(model, _HostSequence):
        model.__class__ = _host_class(type(model), attribute)


def release(model: nn.Module) -> None:
    """Undo :func:`adopt`: the model gets its own class back."""
    if isinstance(model, _HostSequence):
        model.__class__ = model._metaperturb_base  # type: ignore[assignment]
