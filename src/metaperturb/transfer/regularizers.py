"""The regularizers MetaPerturb is compared with, attached by forward hooks at phi's sites.

Both act after the same blocks that :func:`metaperturb.wrap` would perturb, so the comparison
differs in what is done there, not where. Neither adds modules or keys to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers.drop import drop_block_2d
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..discovery import plan_sites

__all__ = ["DropBlock", "ManifoldMixup"]


def _site_modules(model: nn.Module, input_size: Sequence[int]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    return [modules[site.name] for site in plan_sites(model, input_size=input_size).sites]


class DropBlock:
    """DropBlock (Ghiasi et al. 2018; timm's ``drop_block_2d``) after every block, in training.

    Args:
        model: the host.
        rate: probability of dropping a unit (timm's ``drop_prob``).
        block_size: side of the dropped squares, clipped to the feature map.
        input_size: (C, H, W), for finding the blocks.
    """

    def __init__(
        self, model: nn.Module, rate: float, block_size: int, input_size: Sequence[int]
    ) -> None:
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"DropBlock rate must lie in [0, 1), got {rate}.")
        if block_size < 1:
            raise ValueError(f"DropBlock block_size must be positive, got {block_size}.")
        self.rate, self.block_size = rate, block_size
        self.handles: list[RemovableHandle] = [
            module.register_forward_hook(self._hook) for module in _site_modules(model, input_size)
        ]

    def _hook(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        if not module.training or self.rate == 0.0:
            return output
        size = min(self.block_size, output.shape[-2], output.shape[-1])
        return drop_block_2d(output, drop_prob=self.rate, block_size=size)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class ManifoldMixup:
    """Manifold Mixup (Verma et al. 2019): mix pairs of examples at a random layer.

    Each training batch picks one layer uniformly among the input and the blocks' outputs,
    mixes every example with a shuffled partner there, ``lam * h + (1 - lam) * h[perm]`` with
    ``lam ~ Beta(alpha, alpha)``, and mixes the two losses the same way (:meth:`loss`).

    Args:
        model: the host.
        alpha: Beta distribution parameter (larger: mixes nearer 1/2).
        input_size: (C, H, W), for finding the blocks.
    """

    def __init__(self, model: nn.Module, alpha: float, input_size: Sequence[int]) -> None:
        if alpha <= 0:
            raise ValueError(f"Manifold Mixup alpha must be positive, got {alpha}.")
        self.model, self.alpha = model, alpha
        modules = _site_modules(model, input_size)
        self.handles: list[RemovableHandle] = [
            module.register_forward_hook(self._make_hook(index + 1))
            for index, module in enumerate(modules)
        ]
        self.layers = len(modules) + 1  # layer 0 is the input
        self._layer: int | None = None
        self._lam = 1.0
        self._perm: Tensor | None = None

    def _make_hook(self, layer: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
            if self._layer != layer or self._perm is None:
                return output
            return self._mix(output)

        return hook

    def _mix(self, h: Tensor) -> Tensor:
        assert self._perm is not None
        return h * self._lam + h[self._perm] * (1.0 - self._lam)

    def loss(self, images: Tensor, labels: Tensor) -> Tensor:
        """The mixed cross-entropy of one training batch (the model's forward included)."""
        self._lam = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
        self._perm = torch.randperm(images.shape[0], device=images.device)
        self._layer = int(torch.randint(self.layers, ()))
        try:
            logits = self.model(self._mix(images) if self._layer == 0 else images)
        finally:
            self._layer = None
        perm = self._perm
        self._perm = None
        return self._lam * F.cross_entropy(logits, labels) + (1.0 - self._lam) * F.cross_entropy(
            logits, labels[perm]
        )

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
