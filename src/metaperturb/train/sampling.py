"""Batches as a pure function of (seed, task, stream, step): resumable without sampler state.

Each task draws its train and held-out batches from shuffled epochs over its rows. The epoch
permutation, the crop offsets and the flips are all derived from the seed, the task and the step,
never from a generator that advances, so a resumed run, or the same task on another rank, reads
exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..data import normalize, random_crop_flip, to_device

__all__ = ["EpochSampler", "TaskStream", "derive_seed"]


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys, well mixed (numpy's SeedSequence) and stable across
    platforms and Python versions (unlike ``hash``)."""
    state = np.random.SeedSequence([int(key) & 0xFFFFFFFF for key in keys]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


class EpochSampler:
    """Row positions of batch ``step``: consecutive slices of an endless chain of shuffled epochs.

    A batch that runs past the end of an epoch continues into the next one, so every row is seen
    once per epoch whatever the batch size.
    """

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        if size < 1:
            raise ValueError("an EpochSampler needs at least one row.")
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self._cache: dict[int, Tensor] = {}

    def _permutation(self, epoch: int) -> Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            self._cache[epoch] = torch.randperm(self.size, generator=generator)
        return self._cache[epoch]

    def positions(self, step: int) -> Tensor:
        start, stop = step * self.batch_size, (step + 1) * self.batch_size
        parts = []
        for epoch in range(start // self.size, (stop - 1) // self.size + 1):
            low = max(start, epoch * self.size) - epoch * self.size
            high = min(stop, (epoch + 1) * self.size) - epoch * self.size
            parts.append(self._permutation(epoch)[low:high])
        return torch.cat(parts)


class TaskStream:
    """The augmented, normalised batches of one task on one half (train or held-out).

    Args:
        images: the whole dataset, (N, C, H, W) uint8, on the training device.
        local_labels: the task's output index of every dataset row (-1 outside the task).
        rows: the dataset rows of this half.
        batch_size: images per batch.
        keys: integers that name this stream (seed, task, stream id) for :func:`derive_seed`.
        padding, flip: the augmentation (see :func:`metaperturb.data.random_crop_flip`).
        mean, std: per-channel normalisation.
        augment: ``False`` gives the plain images (for evaluation).
    """

    def __init__(
        self,
        images: Tensor,
        local_labels: Tensor,
        rows: Sequence[int],
        batch_size: int,
        keys: Sequence[int],
        *,
        padding: int,
        flip: bool,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = True,
    ) -> None:
        self.images = images
        self.rows = torch.as_tensor(list(rows), dtype=torch.long)
        self.labels = local_labels.to(images.device)
        self.keys = tuple(int(key) for key in keys)
        self.sampler = EpochSampler(len(self.rows), batch_size, derive_seed(*self.keys, 0))
        self.padding, self.flip, self.augment = padding, flip, augment
        # On the images' device once, not converted per batch.
        self.mean = torch.tensor(mean, dtype=torch.float32, device=images.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=images.device)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """Images (float32, normalised) and task-local labels of batch ``step``."""
        rows = to_device(self.rows[self.sampler.positions(step)], self.images.device)
        images = self.images[rows]
        if self.augment and (self.padding or self.flip):
            generator = torch.Generator().manual_seed(derive_seed(*self.keys, 1, step))
            images = random_crop_flip(images, self.padding, self.flip, generator)
        return normalize(images, self.mean, self.std), self.labels[rows]
