"""Pick the best of several meta-trained phi by a short meta-test on a validation task.

Meta-training is noisy: the authors ran it 5 times and kept the phi that did best on a
validation task disjoint from the tasks they report (a held-apart part of CIFAR-100). Here each
candidate phi is frozen on a fresh network trained from scratch on the first half of each
validation class and scored by accuracy on the second half. Each meta-test is one run of the
evaluation harness (:func:`metaperturb.transfer.run_transfer`, the meta-test recipe of METHOD.md
on a shorter schedule), so selection and evaluation train in exactly the same way, and a stopped
selection resumes: finished meta-tests are read back from ``output_dir/meta-tests``. Every
candidate sees the same initialisation, batches and noise draws, so the comparison is paired;
``seeds`` repeats it with other draws and averages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .._atomic import atomic_write
from ..hub import load_phi
from ..transfer.targets import Target

if TYPE_CHECKING:
    from ..transfer.run import TransferConfig

__all__ = ["SelectConfig", "select"]

logger = logging.getLogger(__name__)


@dataclass
class SelectConfig:
    """How candidates are scored; the defaults are a short version of the meta-test recipe."""

    #: phi folders (``save_pretrained``), run folders of ``metaperturb train`` (their ``phi/``),
    #: or Hub repo ids.
    candidates: list[str]
    #: The validation dataset (any source :func:`metaperturb.data.load_images` reads); keep it
    #: disjoint from the datasets you will report results on.
    data: str
    #: Its split; each class's images are halved into train and test rows.
    split: str = "train"
    #: Training resolution and channels of the validation images.
    image_size: int = 32
    channels: int = 3
    #: Keep the first N classes (default: all).
    classes: int | None = None
    #: Images of each class used (after ``skip_per_class``): the first half trains, the second
    #: half tests. Required: the halves are cut by position, so their size must be known.
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
    #: Seed of the first meta-test (repetition k uses ``seed + k``).
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.candidates:
            raise ValueError("select needs at least one candidate phi.")
        for name in ("steps", "batch_size", "seeds", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SelectConfig.{name} must be positive.")
        if self.max_per_class is None or self.max_per_class < 2:
            raise ValueError(
                "select halves the first N images of each validation class into train and test: "
                "give max_per_class (--max-per-class) N >= 2, e.g. 500."
            )

    def target(self) -> Target:
        """The validation task: each class's first half trains, its second half tests."""
        assert self.max_per_class is not None  # checked above
        train = (self.max_per_class + 1) // 2
        return Target(
            data=self.data,
            split=self.split,
            classes=self.classes,
            per_class=train,
            skip_per_class=self.skip_per_class,
            test_split=self.split,
            test_per_class=self.max_per_class - train,
            test_skip_per_class=self.skip_per_class + train,
            image_size=self.image_size,
            channels=self.channels,
        )

    def meta_test_config(
        self, phi: str | None, phi_name: str | None, repeat: int, placement: str = "output"
    ) -> TransferConfig:
        """The evaluation run that scores ``phi`` (``None``: the plain network), placed where
        it was meta-trained (``placement``)."""
        # Imported here: the evaluation harness builds on this package's task networks.
        from ..transfer.run import TransferConfig

        return TransferConfig(
            target=asdict(self.target()),
            model=self.model,
            phi=phi,
            phi_name=phi_name,
            placement=placement,
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            seed=self.seed + repeat,
            curve_every=0,
            eval_modes=False,
            checkpoint_every=max(1, self.steps // 4),
            device=self.device,
        )


def _resolve(candidate: str) -> Path | str:
    path = Path(candidate)
    if (path / "phi" / "model.safetensors").is_file():
        return path / "phi"
    return path if path.exists() else candidate


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
    from ..transfer.run import phi_label, run_transfer

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    candidates = {name: _resolve(name) for name in config.candidates}
    phis = {name: load_phi(source) for name, source in candidates.items()}  # fail early
    # Meta-test results are named by phi's numbers, so the same phi under two names is one run
    # and two different phi never share a result file.
    entries: list[tuple[str, str | None, str | None, str]] = [
        (
            name,
            str(candidates[name]),
            f"{phi_label(name)}-{phi.fingerprint()[:8]}",
            phi.config.placement,
        )
        for name, phi in phis.items()
    ]
    if config.baseline:
        entries.append(("(no phi)", None, None, "output"))
    per_seed: dict[str, list[float]] = {name: [] for name, *_ in entries}
    images: dict[str, int] = {}  # train and test image counts, the same in every meta-test
    with contextlib.ExitStack() as stack:
        if config.output_dir is not None:
            results = Path(config.output_dir) / "meta-tests"
        else:
            results = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        total = len(entries) * config.seeds
        bar = stack.enter_context(tqdm(total=total, unit="meta-test", disable=not config.progress))
        for repeat in range(config.seeds):
            for name, phi, phi_name, placement in entries:
                result = run_transfer(
                    config.meta_test_config(phi, phi_name, repeat, placement),
                    results,
                    progress=False,
                )
                per_seed[name].append(result["accuracy"])
                images = {"train": result["train_images"], "test": result["test_images"]}
                logger.info("%s, seed %d: accuracy %.4f", name, repeat, result["accuracy"])
                bar.update(1)
    scores = {name: sum(v) / len(v) for name, v in per_seed.items()}
    best = max(phis, key=lambda name: scores[name])
    report = {
        "best": best,
        "scores": {name: scores[name] for name in phis},
        "per_seed": per_seed,
        "baseline": scores.get("(no phi)"),
        "validation": {
            "data": f"{Path(config.data).name}/{config.split}",
            "target": asdict(config.target()),
            **images,
        },
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
