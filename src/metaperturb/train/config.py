"""Every setting of a meta-training run, with the authors' values as defaults (METHOD.md)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["RESUMABLE_CHANGES", "TrainConfig"]

#: Fields a resumed run may change; any other difference from the checkpoint is an error,
#: because it would make the resumed run a different experiment.
RESUMABLE_CHANGES = frozenset(
    {
        "steps",
        "checkpoint_every",
        "log_every",
        "resume",
        "progress",
        "device",
        "threads",
        "flush_denormal",
        "dist_timeout",
        "cache_dir",
        "output_dir",
    }
)


#: Fields whose default (``None``) asks for the run's own value on resume.
_DEFAULT_TO_RUN = frozenset({"channels_last"})


def _comparable(name: str, value: Any) -> Any:
    """``value`` as resume compares it: a local data path by the folder it names, so that
    ``../data/x`` and ``/abs/data/x`` are the same dataset."""
    if name == "data" and isinstance(value, str) and Path(value).exists():
        return str(Path(value).resolve())
    return value


def _setting(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text is both its documentation and its ``--help`` line."""
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """A meta-training run of phi: data, tasks, networks, optimisation and bookkeeping.

    Every field is a command-line flag of ``metaperturb train`` (``output_dir`` is
    ``--output-dir``); the help text of each field is its ``--help`` line.

    Example:
        >>> config = TrainConfig(data="../shared/data/tiny-imagenet-200-32px", steps=10)
        >>> config.num_tasks, config.batch_size
        (10, 128)
    """

    # -- data ------------------------------------------------------------------------------
    data: str = _setting(
        "",
        "source dataset: a Hugging Face dataset id, a folder of <split>.parquet files, a "
        ".parquet file or an ImageFolder directory",
    )
    split: str = _setting("train", "split of the source dataset to meta-train on")
    image_size: int = _setting(32, "training resolution in pixels (square; others are resized)")
    channels: int = _setting(3, "image channels: 3 (RGB) or 1 (grayscale)")
    classes: int | None = _setting(None, "keep only the first N classes (default: all)")
    max_per_class: int | None = _setting(
        None, "keep only the first N images of each class (default: all)"
    )
    on_bad_image: str = _setting(
        "error",
        "an image that cannot be decoded: error stops with its row and path, skip leaves it "
        "out with a warning",
        choices=("error", "skip"),
    )
    cache_dir: str | None = _setting(None, "datasets cache folder (default: HF_DATASETS_CACHE)")
    # -- tasks -----------------------------------------------------------------------------
    num_tasks: int = _setting(10, "T, the number of tasks (even: pairs swap their halves)")
    group_size: int | None = _setting(
        None, "classes per group of two tasks (default: all classes / (T/2))"
    )
    task_mode: str = _setting(
        "classwise",
        "classwise: disjoint classes per group (the paper); homogeneous: every task has all "
        "the classes, images divided instead (ablation)",
        choices=("classwise", "homogeneous"),
    )
    split_seed: int | None = _setting(None, "seed of the task split (default: --seed)")
    # -- networks --------------------------------------------------------------------------
    model: str = _setting(
        "cifar_resnet20", "timm model name of the task networks (one per task, own head)"
    )
    sites: str = _setting(
        "block",
        "where phi goes: after every block, or at the end of each stage",
        choices=("block", "stage"),
    )
    placement: str = _setting(
        "output",
        "what phi perturbs: each block's output, or the input of its final activation module "
        "where it has one (the authors' ResNets: the residual sum before the last ReLU)",
        choices=("output", "before_activation"),
    )
    # -- optimisation ----------------------------------------------------------------------
    steps: int = _setting(
        750, "meta-training steps (each: one train and one held-out batch per task)"
    )
    batch_size: int = _setting(128, "images per batch, train and held-out alike")
    lr: float = _setting(1e-3, "Adam learning rate of the task networks")
    weight_decay: float = _setting(5e-4, "Adam weight decay (L2) of the task networks")
    phi_lr: float = _setting(1e-3, "Adam learning rate of phi")
    phi_weight_decay: float = _setting(5e-4, "Adam weight decay (L2) of phi")
    clip: float | None = _setting(
        100.0, "upper clamp of the perturbed features in training (0 or less: none)"
    )
    padding: int = _setting(4, "random-crop padding in pixels (0: no crop)")
    flip: bool = _setting(True, "random horizontal flips")
    seed: int = _setting(0, "seed of phi, the task networks, the batches and the noise")
    # -- running ---------------------------------------------------------------------------
    output_dir: str = _setting(
        "metaperturb-run", "run folder: config, split, metrics log, checkpoint, phi/"
    )
    device: str = _setting("auto", "auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    checkpoint_every: int = _setting(
        100, "write a checkpoint every N steps (and always at the end; 0: only at the end)"
    )
    log_every: int = _setting(10, "write a metrics line every N steps (averaged over them)")
    resume: bool = _setting(False, "continue the run in --output-dir from its checkpoint")
    progress: bool = _setting(True, "show a progress bar")
    threads: int | None = _setting(None, "torch CPU threads per process (default: torch's)")
    flush_denormal: bool = _setting(
        False,
        "flush denormal floats to zero in CPU arithmetic: steps run several times faster once "
        "gradients get tiny, on another floating-point path (recorded in the checkpoint's "
        "segments); a machine setting, so a resumed run may turn it on or off",
    )
    channels_last: bool | None = _setting(
        None,
        "task networks and batches in channels_last memory (default: on a CPU, where the "
        "ResNet-20 meta-training step measured 1.3x faster; the same function, the noise drawn "
        "in another order)",
    )
    dist_timeout: float = _setting(
        1800.0, "seconds a rank waits for the others before torch.distributed gives up"
    )

    def __post_init__(self) -> None:
        problems = []
        positive = ("image_size", "num_tasks", "steps", "batch_size", "log_every")
        problems += [f"{name} must be positive" for name in positive if getattr(self, name) < 1]
        if self.num_tasks % 2:
            problems.append("num_tasks must be even (tasks come in pairs that swap halves)")
        if self.channels not in (1, 3):
            problems.append("channels must be 1 or 3")
        for name in ("lr", "phi_lr", "weight_decay", "phi_weight_decay", "dist_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                problems.append(f"{name} must be a finite number >= 0")
        for name in ("padding", "checkpoint_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        for name in ("classes", "max_per_class", "group_size", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be positive when given")
        for spec in fields(self):
            choices = spec.metadata.get("choices")
            if choices and getattr(self, spec.name) not in choices:
                problems.append(f"{spec.name} must be one of {list(choices)}")
        if not self.data:
            problems.append("data is required (a dataset id, parquet folder or ImageFolder)")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems) + ".")
        if self.clip is not None and self.clip <= 0:
            self.clip = None

    def resolved_channels_last(self, device: torch.device) -> bool:
        """:attr:`channels_last`, its default decided for ``device``."""
        return device.type == "cpu" if self.channels_last is None else self.channels_last

    @property
    def task_seed(self) -> int:
        """Seed of the task split."""
        return self.seed if self.split_seed is None else self.split_seed

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain data (``train_config.json``, the checkpoint)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Read :meth:`to_dict`'s data; unknown fields are an error, not dropped."""
        known = {spec.name for spec in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known: {sorted(known)}.")
        # A run saved before the setting existed trained in NCHW, and resumes that way.
        return cls(**{"channels_last": False, **data})

    def differences(self, other: TrainConfig) -> list[str]:
        """Fields of ``other`` that differ from this (saved) config and may not change on resume,
        as 'name: run has A, asked B'."""
        return [
            f"{spec.name}: run has {getattr(self, spec.name)!r}, asked {getattr(other, spec.name)!r}"
            for spec in fields(self)
            if spec.name not in RESUMABLE_CHANGES
            and not (spec.name in _DEFAULT_TO_RUN and getattr(other, spec.name) is None)
            and _comparable(spec.name, getattr(self, spec.name))
            != _comparable(spec.name, getattr(other, spec.name))
        ]
