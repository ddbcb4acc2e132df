"""Labelled images for meta-training, decoded once into uint8 tensors, augmented on tensors.

A source is a Hugging Face dataset id, a folder of parquet files in the layout of
``../shared/data`` (``<split>.parquet`` or ``<split>-*.parquet``), a single ``.parquet`` file, or
an ImageFolder directory (one sub-folder per class). All of them go through
``datasets.load_dataset``, so column types (``Image``, ``ClassLabel``) and caching behave as the
Hub does. Images are decoded once to a (N, C, H, W) uint8 tensor at the training resolution:
100,000 Tiny ImageNet images at 32 px are 300 MB and decode in about 15 s on one core, after
which a batch is an index into memory and its augmentation a gather. A DataLoader with workers
would cost more than the network on a CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DataError

__all__ = [
    "BadImagePolicy",
    "DataError",
    "ImageData",
    "load_images",
    "normalize",
    "random_crop_flip",
    "to_device",
]

logger = logging.getLogger(__name__)

_LABEL_NAMES = ("label", "labels", "fine_label", "class", "target")
_DECODE_CHUNK = 2048
#: What :func:`load_images` does with an image it cannot decode: stop, or leave it out.
BadImagePolicy = Literal["error", "skip"]


@dataclass
class ImageData:
    """Decoded images of one split, labels renumbered 0..K-1 over the classes kept."""

    #: (N, C, H, W) uint8, on the CPU until the trainer moves it.
    images: Tensor
    #: (N,) int64 class indices into :attr:`class_names`.
    labels: Tensor
    #: Name of each class kept, in label order.
    class_names: list[str]
    #: What was loaded, for logs and model cards (e.g. ``tiny-imagenet-200-32px/train``).
    source: str
    #: Label of each kept class in the original dataset (``original_labels[k]`` for class ``k``).
    original_labels: list[int] = field(default_factory=list)
    #: Dataset rows left out because their image could not be decoded (``on_bad_image="skip"``).
    skipped_rows: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and standard deviation in [0, 1] units, in chunks to bound memory."""
        channels = self.images.shape[1]
        total = torch.zeros(channels, dtype=torch.float64)
        square = torch.zeros(channels, dtype=torch.float64)
        for chunk in self.images.split(8192):
            pixels = chunk.to(torch.float64).div_(255.0).transpose(0, 1).reshape(channels, -1)
            total += pixels.sum(dim=1)
            square += pixels.square().sum(dim=1)
        count = max(1, self.images.numel() // channels)
        mean = total / count
        std = (square / count - mean.square()).clamp(min=1e-12).sqrt()
        return mean.tolist(), std.tolist()


def load_images(
    source: str | Path,
    split: str = "train",
    *,
    image_size: int = 32,
    channels: int = 3,
    classes: int | Sequence[int] | None = None,
    max_per_class: int | None = None,
    skip_per_class: int = 0,
    on_bad_image: BadImagePolicy = "error",
    cache_dir: str | Path | None = None,
) -> ImageData:
    """Load a labelled image dataset and decode it to uint8 tensors at ``image_size``.

    Rows are selected (``classes``, ``max_per_class``) before any image is decoded, so a slice of
    a large dataset costs only the slice.

    Args:
        source: a Hugging Face dataset id, a folder of parquet files (``<split>.parquet``), a
            ``.parquet`` file, or an ImageFolder directory.
        split: the split to load.
        image_size: side of the square training images; others are resized (shorter side) and
            center-cropped.
        channels: 3 (RGB) or 1 (grayscale); images are converted.
        classes: keep the first N classes, or these class labels; ``None`` keeps all.
        max_per_class: keep the first N images of each class (in dataset order), after
            ``skip_per_class``.
        skip_per_class: leave out the first N images of each class, so that a validation slice
            can be disjoint from an evaluation slice that took the first N.
        on_bad_image: an image that cannot be decoded (corrupt, truncated, not an image) is a
            :class:`DataError` naming its row and path (``"error"``), or is left out with a
            warning and listed in :attr:`ImageData.skipped_rows` (``"skip"``).
        cache_dir: the ``datasets`` cache folder; default: ``HF_DATASETS_CACHE``.

    Raises:
        DataError: the source cannot be found or has no image or label column, labels are
            negative or beyond the class names, an image cannot be decoded (by default), or the
            selection leaves nothing.

    Example:
        >>> data = load_images("../shared/data/tiny-imagenet-200-32px", classes=4)  # doctest: +SKIP
        >>> data.images.shape  # doctest: +SKIP
        torch.Size([2000, 3, 32, 32])
    """
    if image_size < 1:
        raise DataError(f"image_size must be positive, got {image_size}.")
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}.")
    if max_per_class is not None and max_per_class < 1:
        raise DataError(f"max_per_class must be positive, got {max_per_class}.")
    if skip_per_class < 0:
        raise DataError(f"skip_per_class must be 0 or more, got {skip_per_class}.")
    if on_bad_image not in ("error", "skip"):
        raise DataError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}.")
    dataset, name = _load_split(source, split, cache_dir)
    image_column, label_column, names = _columns(dataset, name)
    labels = np.asarray(dataset.data.column(label_column).to_numpy(zero_copy_only=False))
    if labels.size == 0:
        raise DataError(f"{name} is empty: point --data/--split at a split that has images.")
    _check_labels(labels, names, label_column, name)
    rows, kept = _select(labels, classes, max_per_class, name, skip_per_class)
    if names is None:
        names = [str(k) for k in range(int(labels.max()) + 1)]
    remap = np.full(max(len(names), int(labels.max()) + 1), -1, dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    subset = dataset.select(rows.tolist()) if len(rows) != len(dataset) else dataset
    images, bad = _decode(subset, image_column, image_size, channels, name, rows, on_bad_image)
    skipped: list[int] = []
    if bad:
        skipped = [int(row) for row in rows[bad]]
        good = np.ones(len(rows), dtype=bool)
        good[bad] = False
        images, rows = images[torch.from_numpy(good)], rows[good]
        empty = sorted(set(kept) - {int(k) for k in np.unique(labels[rows])})
        if empty:
            raise DataError(
                f"{name}: no readable image left in classes {[names[k] for k in empty]} after "
                f"skipping {len(bad)} unreadable ones; fix the files or leave the classes out."
            )
    return ImageData(
        images=images,
        labels=torch.from_numpy(remap[labels[rows]]),
        class_names=[names[k] for k in kept],
        source=name,
        original_labels=[int(k) for k in kept],
        skipped_rows=skipped,
    )


def _load_split(source: str | Path, split: str, cache_dir: str | Path | None) -> tuple[Any, str]:
    """The ``datasets.Dataset`` of ``split`` and a short name for it."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(source).expanduser()
    options: dict[str, Any] = {"cache_dir": str(cache_dir) if cache_dir is not None else None}
    try:
        if path.is_file():
            if path.suffix != ".parquet":
                raise DataError(
                    f"{path} is a file but not a .parquet file: pass a parquet file, a folder of "
                    "them, an ImageFolder or a Hub dataset id."
                )
            files: dict[str, str | list[str]] = {split: str(path)}
            return datasets.load_dataset("parquet", data_files=files, split=split, **options), (
                f"{path.parent.name}/{path.stem}"
            )
        if path.is_dir():
            parquet = sorted(path.glob(f"{split}.parquet")) or sorted(
                path.glob(f"{split}-*.parquet")
            )
            parquet = parquet or sorted(path.glob(f"data/{split}-*.parquet"))
            if parquet:
                files = {split: [str(file) for file in parquet]}
                dataset = datasets.load_dataset("parquet", data_files=files, split=split, **options)
                return dataset, f"{path.name}/{split}"
            if any(path.rglob("*.parquet")):
                found = sorted({p.stem.split("-")[0] for p in path.rglob("*.parquet")})
                raise DataError(
                    f"{path} has no parquet file for split {split!r}; splits found: {found}. "
                    "Pass one of them with --split."
                )
            if not any(p.is_dir() for p in path.iterdir()):
                raise DataError(
                    f"{path} holds neither parquet files nor class sub-folders (ImageFolder): "
                    "point --data at the folder that holds them."
                )
            dataset = datasets.load_dataset(
                "imagefolder", data_dir=str(path), split=split, **options
            )
            return dataset, f"{path.name}/{split}"
        if isinstance(source, Path) or str(source).startswith((".", "/", "~")):
            raise DataError(f"{source} does not exist (a local dataset folder or file was meant).")
        return datasets.load_dataset(str(source), split=split, **options), f"{source}/{split}"
    except DataError:
        raise
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as error:
        raise DataError(
            f"could not load split {split!r} of {source!s} ({type(error).__name__}: {error}). "
            "Pass a Hugging Face dataset id, a folder of <split>.parquet files, a .parquet file "
            "or an ImageFolder directory; offline, a Hub dataset must already be in the cache."
        ) from error


def _columns(dataset: Any, name: str) -> tuple[str, str, list[str] | None]:
    """The image column, the label column and the class names (``None`` if not recorded)."""
    import datasets

    features = dataset.features
    images = [key for key, value in features.items() if isinstance(value, datasets.Image)]
    if not images:
        raise DataError(
            f"{name} has no image column (columns: {list(features)}); an Image feature is needed."
        )
    labels = [key for key, value in features.items() if isinstance(value, datasets.ClassLabel)]
    if labels:
        return images[0], labels[0], list(features[labels[0]].names)
    for key in _LABEL_NAMES:
        value = features.get(key)
        if isinstance(value, datasets.Value) and value.dtype.startswith(("int", "uint")):
            return images[0], key, None
    raise DataError(
        f"{name} has no label column (columns: {list(features)}); a ClassLabel feature or an "
        f"integer column named one of {list(_LABEL_NAMES)} is needed."
    )


def _check_labels(labels: np.ndarray, names: list[str] | None, column: str, name: str) -> None:
    """Refuse labels below 0 or beyond the class names: they would index the wrong class."""
    negative = np.flatnonzero(labels < 0)
    if negative.size:
        raise DataError(
            f"{name}: column {column!r} has {negative.size} negative labels (unlabelled rows?), "
            f"first at rows {negative[:5].tolist()}. Use a labelled split or drop those rows."
        )
    if names is not None:
        beyond = np.flatnonzero(labels >= len(names))
        if beyond.size:
            raise DataError(
                f"{name}: column {column!r} has {beyond.size} labels beyond its {len(names)} "
                f"class names (0..{len(names) - 1}), first at rows {beyond[:5].tolist()} "
                f"(labels {labels[beyond[:5]].tolist()}). Fix the labels or the ClassLabel names."
            )


def _select(
    labels: np.ndarray,
    classes: int | Sequence[int] | None,
    max_per_class: int | None,
    name: str,
    skip_per_class: int = 0,
) -> tuple[np.ndarray, list[int]]:
    """Rows to keep (dataset order) and the original labels of the classes kept (sorted)."""
    present = sorted({int(k) for k in np.unique(labels)})
    if classes is None:
        kept = present
    elif isinstance(classes, int):
        if not 1 <= classes <= len(present):
            raise DataError(
                f"{name} has {len(present)} classes with images; cannot keep the first "
                f"{classes}: ask for 1 to {len(present)} classes (--classes)."
            )
        kept = present[:classes]
    else:
        kept = sorted({int(k) for k in classes})
        missing = sorted(set(kept) - set(present))
        if missing:
            raise DataError(
                f"{name} has no images of classes {missing}; it has {len(present)} classes "
                f"with images, labels {present[0]}..{present[-1]}: name classes among those."
            )
    mask = np.isin(labels, kept)
    rows = np.flatnonzero(mask)
    if max_per_class is not None or skip_per_class:
        order = labels[rows]
        sort = np.argsort(order, kind="stable")
        ranked = np.empty_like(sort)
        starts = np.searchsorted(order[sort], order[sort], side="left")
        ranked[sort] = np.arange(len(sort)) - starts
        keep = ranked >= skip_per_class
        if max_per_class is not None:
            keep &= ranked < skip_per_class + max_per_class
        rows = rows[keep]
    if len(rows) == 0:
        raise DataError(
            f"{name}: the selection of classes and images is empty: skip fewer images per "
            "class, or keep more classes or images per class."
        )
    return rows, kept


def _decode(
    dataset: Any,
    column: str,
    size: int,
    channels: int,
    name: str,
    rows: np.ndarray,
    on_bad_image: BadImagePolicy = "error",
) -> tuple[Tensor, list[int]]:
    """Decode every image to (N, C, size, size) uint8 through the ``Image`` feature (PIL).

    ``rows`` are the dataset rows of ``dataset``'s items, for messages. Returns the images and
    the positions that could not be decoded (left as zeros; only with ``on_bad_image="skip"``).
    """
    out = torch.empty(len(dataset), channels, size, size, dtype=torch.uint8)
    bad: list[int] = []
    for start in range(0, len(dataset), _DECODE_CHUNK):
        stop = min(start + _DECODE_CHUNK, len(dataset))
        try:
            batch = dataset[start:stop][column]
        except Exception:  # noqa: BLE001 - one bad image spoils the chunk: decode one by one
            batch = [_decode_one(dataset, position, column) for position in range(start, stop)]
        for offset, image in enumerate(batch):
            position = start + offset
            try:
                if image is None:
                    raise ValueError("the row has no image")
                if isinstance(image, Exception):
                    raise image
                out[position] = _to_pixels(image, size, channels)
            except Exception as error:
                path = _image_path(dataset, position, column)
                where = f"row {int(rows[position])}" + (f" ({path})" if path else "")
                if on_bad_image == "error":
                    raise DataError(
                        f"{name}: the image of {where} cannot be decoded "
                        f"({type(error).__name__}: {error}). Fix or remove it, or pass "
                        "on_bad_image='skip' (--on-bad-image skip) to leave such images out."
                    ) from error
                logger.warning("%s: skipping the image of %s (%s)", name, where, error)
                out[position] = 0
                bad.append(position)
    logger.info("decoded %d images of %s at %dx%d", len(dataset) - len(bad), name, size, size)
    if bad:
        logger.warning("%s: %d unreadable images skipped", name, len(bad))
    return out, bad


def _decode_one(dataset: Any, position: int, column: str) -> Any:
    """The decoded image at ``position``, or the exception decoding it raised."""
    try:
        return dataset[position][column]
    except Exception as error:  # noqa: BLE001 - PIL raises many kinds; reported by the caller
        return error


def _image_path(dataset: Any, position: int, column: str) -> str | None:
    """The file name recorded with an image (without decoding it), for messages."""
    try:
        value = dataset.with_format("arrow")[position][column][0].as_py()
        return value.get("path") if isinstance(value, dict) else None
    except Exception:  # noqa: BLE001 - only for a message: never hide the decoding error
        return None


def _to_pixels(image: Any, size: int, channels: int) -> Tensor:
    """A PIL image as (C, size, size) uint8: converted, resized (shorter side), center-cropped."""
    from PIL import Image

    image = image.convert("RGB" if channels == 3 else "L")
    if image.size != (size, size):
        width, height = image.size
        scale = size / min(width, height)
        new = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(new, Image.Resampling.BICUBIC)
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1) if channels == 3 else pixels[None]


def random_crop_flip(
    images: Tensor, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Random crop with zero padding and random horizontal flip, per image, as one gather.

    Works on any dtype and device (uint8 on the GPU included); the random draws come from
    ``generator`` (a CPU generator) so that a batch's augmentation is reproducible from a seed
    whatever device the images live on.

    Args:
        images: (B, C, H, W).
        padding: pixels of zero padding on each side before the crop; 0 disables the crop.
        flip: flip each image left-right with probability 1/2.
        generator: source of randomness; default: torch's global CPU generator.
    """
    batch, channels, height, width = images.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator)
    flips = (
        torch.rand(batch, generator=generator) < 0.5
        if flip
        else torch.zeros(batch, dtype=torch.bool)
    )
    device = images.device
    rows = offsets[0, :, None] + torch.arange(height)
    columns = torch.arange(width).expand(batch, width)
    columns = torch.where(flips[:, None], width - 1 - columns, columns) + offsets[1, :, None]
    # One host-to-device copy for both index maps (each copy is a queued transfer on a GPU).
    rows, columns = to_device(torch.cat([rows, columns], dim=1), device).split([height, width], 1)
    padded = F.pad(images, (padding,) * 4) if padding else images
    return padded[
        torch.arange(batch, device=device)[:, None, None, None],
        torch.arange(channels, device=device)[None, :, None, None],
        rows[:, None, :, None],
        columns[:, None, None, :],
    ]


def normalize(
    images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor
) -> Tensor:
    """uint8 (B, C, H, W) to float32, scaled to [0, 1] then standardised per channel.

    ``mean`` and ``std`` as float32 tensors on the images' device spare a host-to-device copy
    per batch (see :func:`to_device`); lists are converted on every call.
    """
    shape = (1, -1, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(shape)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(shape)
    return (images.to(torch.float32) / 255.0 - mean_t) / std_t


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor.to(device)`` that does not make the host wait for the GPU.

    A copy from ordinary (pageable) host memory to a CUDA device synchronises the stream: the
    host waits for every kernel queued so far, so it cannot queue the next step's kernels
    meanwhile. From pinned memory the copy is queued like a kernel instead; torch's caching
    host allocator keeps the pinned buffer until the copy has run. Elsewhere a plain ``.to``.
    """
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
