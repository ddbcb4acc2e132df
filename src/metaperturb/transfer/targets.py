"""Target tasks: which images a network trains on and which it is tested on.

A target names a dataset (anything :func:`metaperturb.data.load_images` reads), a train slice
and a test slice. The presets are the evaluation's targets in ``../shared/data``; any other
dataset works through :class:`Target` directly or the ``metaperturb eval`` flags.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..data import ImageData, load_images

__all__ = ["PRESETS", "Target", "load_target", "resolve_target"]


@dataclass(frozen=True)
class Target:
    """A train slice and a test slice of a labelled image dataset.

    When ``test_split`` equals ``split``, set ``test_skip_per_class`` to at least ``per_class``
    so that the two slices are disjoint (the constructor checks).
    """

    #: Dataset source: a Hub id, a parquet folder or file, or an ImageFolder directory.
    data: str
    split: str = "train"
    #: Keep the first N classes (``None``: all).
    classes: int | None = None
    #: Images per class for training, after skipping ``skip_per_class`` (``None``: all).
    per_class: int | None = None
    skip_per_class: int = 0
    test_split: str = "test"
    test_per_class: int | None = None
    test_skip_per_class: int = 0
    image_size: int = 32
    channels: int = 3

    def __post_init__(self) -> None:
        if self.test_split == self.split:
            train_end = None if self.per_class is None else self.skip_per_class + self.per_class
            overlap = train_end is None or (
                self.test_skip_per_class < train_end
                and self.skip_per_class
                < self.test_skip_per_class + (self.test_per_class or 1 << 62)
            )
            if overlap:
                raise ValueError(
                    f"train and test both come from split {self.split!r} and overlap: give the "
                    "train slice a per_class and start the test slice after it "
                    "(test_skip_per_class >= skip_per_class + per_class)."
                )


#: The evaluation's targets, relative to a data root holding ``../shared/data``'s folders.
PRESETS: dict[str, Target] = {
    # 500 a class of CIFAR-10 train; the full test split (10,000).
    "s-cifar10": Target("cifar10", per_class=500),
    # 500 a class of Fashion-MNIST train, resized to 32 px; the full test split.
    "s-fashion-mnist": Target("fashion-mnist", per_class=500, channels=1),
    # MNIST-10k has one split: the first 500 digits of each class train, the rest test.
    "mnist-10k": Target(
        "mnist-10k", per_class=500, test_split="train", test_skip_per_class=500, channels=1
    ),
    # Omniglot's evaluation alphabets, first 100 characters: 15 drawings train, 5 test.
    "omniglot-100": Target(
        "omniglot",
        split="evaluation",
        classes=100,
        per_class=15,
        test_split="evaluation",
        test_skip_per_class=15,
        test_per_class=5,
        channels=1,
    ),
}


def resolve_target(name_or_target: str | Target, data_root: str | Path | None = None) -> Target:
    """A preset by name (its ``data`` joined to ``data_root``), or the target itself."""
    if isinstance(name_or_target, Target):
        return name_or_target
    if name_or_target not in PRESETS:
        raise ValueError(
            f"no target preset {name_or_target!r}; presets: {', '.join(PRESETS)}. Other data: "
            "pass a Target (or --data with the slice flags)."
        )
    target = PRESETS[name_or_target]
    if data_root is not None:
        target = replace(target, data=str(Path(data_root) / target.data))
    return target


def load_target(target: Target) -> tuple[ImageData, ImageData]:
    """Decode the train and the test slice (same classes, same label indices)."""

    def load(split: str, per_class: int | None, skip: int) -> ImageData:
        return load_images(
            target.data,
            split,
            image_size=target.image_size,
            channels=target.channels,
            classes=target.classes,
            max_per_class=per_class,
            skip_per_class=skip,
        )

    train = load(target.split, target.per_class, target.skip_per_class)
    test = load(target.test_split, target.test_per_class, target.test_skip_per_class)
    if test.original_labels != train.original_labels:
        raise ValueError(
            f"{target.data}: the test slice has classes {test.original_labels[:5]}... and the "
            f"train slice {train.original_labels[:5]}...; both need every class."
        )
    return train, test
