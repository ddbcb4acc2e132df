"""Pick the best of several meta-trained phi by a short meta-test on a validation task.

Meta-training is noisy: the authors ran it 5 times and kept the phi that did best on a
validation task disjoint from the tasks they report (a held-apart part of CIFAR-100). Here each
candidate phi is frozen on a fresh network trained from scratch on the validation data's train
half (the meta-test recipe of METHOD.md, shortened: Adam, lr x0.3 at 40/70/90% of the steps,
strength ramped over the first 40%), and scored by accuracy on the other half. Every candidate
sees the same initialisation, batches and noise draws, so the comparison is paired; ``seeds``
repeats it with other draws and averages.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._atomic import atomic_write
from ..annealing import StrengthScheduler
from ..data import ImageData, load_images, normalize
from ..hub import load_phi
from ..phi import Perturbation
from ..wrapper import set_eval_mode, wrap
from .learner import create_task_network
from .sampling import TaskStream, derive_seed

__all__ = ["SelectConfig", "meta_test", "select"]

logger = logging.getLogger(__name__)

_NOISE_KEY = 11


@dataclass
class SelectConfig:
    """How candidates are scored; the defaults are a short version of the meta-test recipe."""

    #: phi folders (``save_pretrained``), run folders of ``metaperturb train`` (their ``phi/``),
    #: or Hub repo ids.
    candidates: list[str]
    #: The validation dataset (any source :func:`metaperturb.data.load_images` reads); keep it
    #: disjoint from the datasets you will report results on.
    data: str
    #: Its split; it is halved class by class into train and test rows.
    split: str = "train"
    #: Training resolution and channels of the validation images.
    image_size: int = 32
    channels: int = 3
    #: Keep the first N classes / N images of each class (default: all).
    classes: int | None = None
    max_per_class: int | None = None
    #: Leave out the first N images of each class (those an evaluation slice takes).
    skip_per_class: int = 0
    #: The network trained from scratch with each phi (a timm name).
    model: str = "cifar_resnet20"
    #: Meta-test length and optimisation (Adam, lr x0.3 at 40/70/90% of the steps).
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 5e-4
    #: Repetitions with other initialisations, batches and noise; the score is their mean.
    seeds: int = 1
    #: Also score the plain network without phi, for reference (not a candidate).
    baseline: bool = False
    #: Where ``selection.json`` and ``best/`` (a copy of the winner) go; ``None``: nowhere.
    output_dir: str | None = None
    #: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; CPU threads; progress bar.
    device: str = "auto"
    threads: int | None = None
    progress: bool = True
    #: Seed of the validation halves and of every meta-test.
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.candidates:
            raise ValueError("select needs at least one candidate phi.")
        for name in ("steps", "batch_size", "seeds", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SelectConfig.{name} must be positive.")


def _resolve(candidate: str) -> Path | str:
    path = Path(candidate)
    if (path / "phi" / "model.safetensors").is_file():
        return path / "phi"
    return path if path.exists() else candidate


def _halves(labels: Sequence[int], seed: int) -> tuple[list[int], list[int]]:
    """Train and test rows: each class's rows shuffled and halved."""
    rows_of: dict[int, list[int]] = {}
    for row, label in enumerate(labels):
        rows_of.setdefault(int(label), []).append(row)
    shuffle = random.Random(seed)
    train: list[int] = []
    test: list[int] = []
    for label in sorted(rows_of):
        rows = rows_of[label]
        shuffle.shuffle(rows)
        train += rows[: (len(rows) + 1) // 2]
        test += rows[(len(rows) + 1) // 2 :]
    return sorted(train), sorted(test)


def meta_test(
    phi: Perturbation | None,
    data: ImageData,
    train_rows: Sequence[int],
    test_rows: Sequence[int],
    config: SelectConfig,
    seed: int,
    device: torch.device,
) -> float:
    """Train a fresh network on ``train_rows`` with ``phi`` frozen; its accuracy on ``test_rows``.

    ``phi=None`` trains the plain network (the baseline).
    """
    mean, std = data.channel_stats()
    images = data.images.to(device)
    stream = TaskStream(
        images,
        data.labels,
        train_rows,
        config.batch_size,
        (seed, 0, 0),
        padding=4,
        flip=True,
        mean=mean,
        std=std,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, 1))
        model = create_task_network(config.model, data.num_classes, config.channels)
    model.to(device)
    scheduler = None
    if phi is not None:
        size = (config.channels, config.image_size, config.image_size)
        model = wrap(model, phi=phi, input_size=size)  # frozen: only the network learns
        scheduler = StrengthScheduler(model, total_steps=config.steps)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    milestones = [int(config.steps * f) for f in (0.4, 0.7, 0.9)]
    lr_schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.3)
    model.train()
    for step in range(config.steps):
        torch.manual_seed(derive_seed(seed, _NOISE_KEY, step))
        batch, labels = stream.batch(step)
        loss = F.cross_entropy(model(batch), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        if scheduler is not None:
            scheduler.step()
    model.eval()
    if phi is not None:
        set_eval_mode(model, "expectation")
    correct = 0
    rows = torch.as_tensor(list(test_rows), dtype=torch.long)
    with torch.no_grad():
        for chunk in rows.split(512):
            batch = normalize(images[chunk.to(device)], mean, std)
            predictions = model(batch).argmax(dim=1).cpu()
            correct += int((predictions == data.labels[chunk]).sum())
    return correct / max(1, len(rows))


def select(config: SelectConfig) -> dict[str, Any]:
    """Score every candidate and return the report; copy the winner to ``output_dir/best``.

    Returns:
        ``{"best": candidate, "scores": {candidate: mean accuracy}, "per_seed": {...},
        "baseline": accuracy or None, "config": {...}}``.

    Example:
        >>> report = select(SelectConfig(["runs/phi-0", "runs/phi-1"], data="val"))  # doctest: +SKIP
        >>> report["best"]  # doctest: +SKIP
        'runs/phi-1'
    """
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu")
        if config.device == "auto"
        else config.device
    )
    data = load_images(
        config.data,
        config.split,
        image_size=config.image_size,
        channels=config.channels,
        classes=config.classes,
        max_per_class=config.max_per_class,
        skip_per_class=config.skip_per_class,
    )
    train_rows, test_rows = _halves(data.labels.tolist(), config.seed)
    candidates = {name: _resolve(name) for name in config.candidates}
    phis = {name: load_phi(source) for name, source in candidates.items()}  # fail early
    entries: list[tuple[str, Perturbation | None]] = list(phis.items())
    if config.baseline:
        entries.append(("(no phi)", None))
    per_seed: dict[str, list[float]] = {name: [] for name, _ in entries}
    total = len(entries) * config.seeds
    with tqdm(total=total, unit="meta-test", disable=not config.progress) as bar:
        for repeat in range(config.seeds):
            seed = derive_seed(config.seed, repeat)
            for name, phi in entries:
                accuracy = meta_test(phi, data, train_rows, test_rows, config, seed, device)
                per_seed[name].append(accuracy)
                logger.info("%s, seed %d: accuracy %.4f", name, repeat, accuracy)
                bar.update(1)
    scores = {name: sum(v) / len(v) for name, v in per_seed.items()}
    best = max(phis, key=lambda name: scores[name])
    report = {
        "best": best,
        "scores": {name: scores[name] for name in phis},
        "per_seed": per_seed,
        "baseline": scores.get("(no phi)"),
        "validation": {"data": data.source, "train": len(train_rows), "test": len(test_rows)},
        "config": asdict(config),
    }
    if config.output_dir is not None:
        output = Path(config.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        source = candidates[best]
        if isinstance(source, Path) and source.is_dir():
            target = output / "best"
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(source, target)
        else:
            phis[best].save_pretrained(output / "best")
        atomic_write(output / "selection.json", json.dumps(report, indent=2) + "\n")
    return report
