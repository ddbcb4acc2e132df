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

One validation task can miss a failure another shows: phi* passed a 10-class CIFAR-10 meta-test
and then closed ResNet-20's last block on 100-class Omniglot, collapsing the network when its
strength reached 1 (docs/evaluation.md). ``extra_tasks`` scores candidates on more tasks (their
mean), and a candidate whose meta-test closes a site at full strength (phi's channel scale s below
:data:`~metaperturb.diagnostics.CLOSED_BELOW` at the end of the strength ramp) is passed over
for one that closes none.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._atomic import atomic_write
from .._serialization import write_folder
from ..diagnostics import closed_among
from ..hub import load_phi
from ..transfer.config import TransferConfig, phi_label
from ..transfer.targets import Target

__all__ = ["SelectConfig", "choose_best", "select"]

#: The fields of :class:`SelectConfig` that define a validation task (``extra_tasks`` keys).
TASK_FIELDS = (
    "data",
    "split",
    "image_size",
    "channels",
    "classes",
    "max_per_class",
    "skip_per_class",
    "model",
)

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
    #: More validation tasks, each the fields of :data:`TASK_FIELDS` that differ from the first
    #: task's (e.g. ``{"data": "omniglot", "split": "background", "classes": 100,
    #: "max_per_class": 20, "channels": 1}``); a candidate's score is its mean over the tasks.
    extra_tasks: list[dict[str, Any]] = field(default_factory=list)
    #: Pass over candidates that close a site at full strength when another does not (see the
    #: module docstring). Meaningful on the full schedule: the ramp ends at 40% of ``steps``.
    screen_closed_sites: bool = True

    def __post_init__(self) -> None:
        if not self.candidates:
            raise ValueError("select needs at least one candidate phi.")
        for name in ("steps", "batch_size", "seeds", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"SelectConfig.{name} must be positive, got {getattr(self, name)!r}."
                )
        for extra in self.extra_tasks:
            unknown = sorted(set(extra) - set(TASK_FIELDS))
            if unknown:
                raise ValueError(
                    f"extra_tasks: {unknown} do not define a validation task; use {TASK_FIELDS}."
                )
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

    def task_configs(self) -> list[SelectConfig]:
        """Every validation task as a config of its own: the first (this config's fields), then
        each of ``extra_tasks`` (this config with those fields replaced, the network included:
        a pre-activation host hands phi other features than ResNet-20's block outputs)."""
        first = replace(self, extra_tasks=[])
        return [first, *(replace(first, **extra) for extra in self.extra_tasks)]

    def tasks(self) -> list[Target]:
        """Every validation task's data: the first, then ``extra_tasks``."""
        return [task.target() for task in self.task_configs()]

    def meta_test_config(
        self,
        phi: str | None,
        phi_name: str | None,
        repeat: int,
        placement: str = "output",
    ) -> TransferConfig:
        """The evaluation run that scores ``phi`` (``None``: the plain network) on this config's
        first task, placed where it was meta-trained (``placement``)."""
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


def choose_best(
    scores: dict[str, float], closed: dict[str, dict[str, list[str]]], screen: bool = True
) -> str:
    """The best-scoring candidate; with ``screen``, among those that closed no site (all of
    them when every one did)."""
    open_ = [name for name in scores if not any(closed.get(name, {}).values())]
    pool = open_ if screen and open_ else list(scores)
    return max(pool, key=lambda name: scores[name])


def _task_data(task: Target) -> str:
    return f"{Path(str(task.data)).name}/{task.split}"


def _task_label(task: SelectConfig, index: int, first_model: str) -> str:
    """``1: omniglot/background``; the network too where it is not the first task's."""
    model = f", {task.model}" if task.model != first_model else ""
    return f"{index}: {_task_data(task.target())}{model}"


def _resolve(candidate: str) -> Path | str:
    path = Path(candidate)
    if (path / "phi" / "model.safetensors").is_file():
        return path / "phi"
    return path if path.exists() else candidate


def select(config: SelectConfig) -> dict[str, Any]:
    """Score every candidate and return the report; copy the winner to ``output_dir/best``.

    Returns:
        ``{"best": candidate, "scores": {candidate: mean accuracy over the tasks}, "tasks":
        [{"label", "target", "scores", "per_seed", ...} per task], "closed_sites": {candidate:
        {task: [sites]}}, "screened_out": [...], "baseline": accuracy or None, ...}``.

    Example:
        >>> report = select(SelectConfig(["runs/phi-0", "runs/phi-1"], data="val"))  # doctest: +SKIP
        >>> report["best"]  # doctest: +SKIP
        'runs/phi-1'
    """
    # Imported here: the evaluation harness builds on this package's task networks.
    from ..transfer.run import run_transfer

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
    task_configs = config.task_configs()
    tasks = [task.target() for task in task_configs]
    labels = [_task_label(task, index, config.model) for index, task in enumerate(task_configs)]
    per_seed: dict[str, dict[str, list[float]]] = {
        label: {name: [] for name, *_ in entries} for label in labels
    }
    # Sites closed at full strength, by candidate and task (any seed).
    closed: dict[str, dict[str, list[str]]] = {name: {} for name in phis}
    images: dict[str, dict[str, int]] = {}  # train and test image counts, by task
    with contextlib.ExitStack() as stack:
        if config.output_dir is not None:
            results = Path(config.output_dir) / "meta-tests"
        else:
            results = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        total = len(tasks) * len(entries) * config.seeds
        bar = stack.enter_context(tqdm(total=total, unit="meta-test", disable=not config.progress))
        for task_config, label in zip(task_configs, labels, strict=True):
            for repeat in range(config.seeds):
                for name, phi, phi_name, placement in entries:
                    result = run_transfer(
                        task_config.meta_test_config(phi, phi_name, repeat, placement),
                        results,
                        progress=False,
                    )
                    per_seed[label][name].append(result["accuracy"])
                    images[label] = {"train": result["train_images"], "test": result["test_images"]}
                    scales = result.get("scales_at_full_strength") or {}
                    shut = sorted(closed_among(scales))
                    if phi is not None and shut:
                        sites = closed[name].setdefault(label, [])
                        sites += [site for site in shut if site not in sites]
                    logger.info(
                        "%s, %s, seed %d: accuracy %.4f%s",
                        name,
                        label,
                        repeat,
                        result["accuracy"],
                        f", closed at full strength: {shut}" if phi is not None and shut else "",
                    )
                    bar.update(1)
    by_task = {
        label: {name: sum(v) / len(v) for name, v in seeds.items()}
        for label, seeds in per_seed.items()
    }
    scores = {
        name: sum(by_task[label][name] for label in labels) / len(labels) for name, *_ in entries
    }
    candidate_scores = {name: scores[name] for name in phis}
    best = choose_best(candidate_scores, closed, config.screen_closed_sites)
    screened = [name for name in phis if any(closed[name].values())]
    if best in screened:
        logger.warning(
            "every candidate closed a site at full strength; %s is the best score anyway: "
            "leave its closed sites out (wrap(..., exclude=[...])) where it is used.",
            best,
        )
    first = labels[0]
    report = {
        "best": best,
        "scores": candidate_scores,
        # The first task's, as before extra tasks existed; every task's is under "tasks".
        "per_seed": per_seed[first],
        "baseline": scores.get("(no phi)"),
        "validation": {
            "data": f"{Path(config.data).name}/{config.split}",
            "target": asdict(tasks[0]),
            **images[first],
        },
        "tasks": [
            {
                "label": label,
                "data": _task_data(task),
                "model": task_config.model,
                "target": asdict(task),
                **images[label],
                "scores": by_task[label],
                "per_seed": per_seed[label],
            }
            for task, task_config, label in zip(tasks, task_configs, labels, strict=True)
        ],
        "closed_sites": {name: sites for name, sites in closed.items() if sites},
        "screened_out": [name for name in screened if name != best],
        "config": asdict(config),
    }
    if config.output_dir is not None:
        output = Path(config.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        source = candidates[best]
        if isinstance(source, Path) and source.is_dir():
            # The candidate's own files (its card keeps the run's provenance), all or none; then
            # whatever an earlier winner left that this one does not have.
            target = output / "best"
            files = {path.name: path.read_bytes() for path in source.iterdir() if path.is_file()}
            write_folder(target, files)
            for stale in target.iterdir():
                if stale.is_dir():
                    shutil.rmtree(stale)
                elif stale.name not in files:
                    stale.unlink()
        else:
            phis[best].save_pretrained(output / "best")
        atomic_write(output / "selection.json", json.dumps(report, indent=2) + "\n")
    return report
