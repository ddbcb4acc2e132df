"""The meta-training tasks: classes split into groups, each group's images halved and swapped.

MetaPerturb meta-trains phi on T tasks made from one source dataset (METHOD.md, "Meta-training").
The classes are shuffled and cut into T/2 disjoint groups; the images of each group are halved
into A and B; task 2g trains on A and measures phi's held-out loss on B, task 2g+1 the reverse.
Pairing the halves means every image serves once as training data and once as held-out data, and
the held-out batch of a task is never seen by that task's network.

The halving is done class by class (each class's images shuffled and halved), so both halves of
a group hold every class of the group in equal numbers (to one image); the authors halved the
group as a whole, which gives the same expectation with more variance.

The homogeneous ablation (``mode="homogeneous"``) removes the heterogeneity between tasks but
keeps everything else: the same classes, every task gets all of them, and the images of each class
are divided among the T/2 groups instead of the classes. A task then has as many images as in the
class-wise split.

A split is plain data (indices into the dataset it was made from) and is saved as JSON with the
run, so a resumed or audited run uses exactly the same tasks.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ._atomic import atomic_write
from .errors import SplitError

__all__ = ["SplitError", "Task", "TaskMode", "TaskSplit", "make_split"]

#: ``"classwise"``: disjoint classes per group (the paper). ``"homogeneous"``: every task has all
#: the classes, the images are divided instead (ablation).
TaskMode = Literal["classwise", "homogeneous"]
_MODES = ("classwise", "homogeneous")
_FORMAT_VERSION = 1


@dataclass
class Task:
    """One meta-training task: its classes and the dataset rows of its two halves."""

    #: Position of the task, 0..T-1; tasks ``2g`` and ``2g + 1`` share group ``g``.
    index: int
    #: The group of classes (class-wise) or of images (homogeneous) the task comes from.
    group: int
    #: Dataset labels of the task's classes; the position in this list is the task network's
    #: output index.
    classes: list[int]
    #: Dataset rows the task network trains on.
    train: list[int]
    #: Dataset rows for phi's held-out loss: the other half of the group.
    heldout: list[int]

    def local_label_map(self, num_classes: int) -> list[int]:
        """``map[label]``: the output index of each dataset label in this task, -1 if absent."""
        mapping = [-1] * num_classes
        for position, label in enumerate(self.classes):
            mapping[label] = position
        return mapping


@dataclass
class TaskSplit:
    """T tasks made from one dataset; see the module docstring for the rules."""

    mode: TaskMode
    num_tasks: int
    group_size: int
    seed: int
    #: Number of rows of the dataset the indices point into (checked when the split is reused).
    num_images: int
    tasks: list[Task] = field(default_factory=list)
    #: Names of the dataset's classes (for people reading the JSON).
    class_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The split as plain data, with its format version (``split.json``)."""
        return {"format_version": _FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSplit:
        """Read :meth:`to_dict`'s data; another format version is an error."""
        data = dict(data)
        version = data.pop("format_version", None)
        if version != _FORMAT_VERSION:
            raise SplitError(
                f"task split format version {version!r} is not {_FORMAT_VERSION}; it was written "
                "by another metaperturb version: use that version, or make a new split."
            )
        tasks = [Task(**task) for task in data.pop("tasks")]
        return cls(tasks=tasks, **data)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the split as JSON (atomically: a temporary file, then a rename)."""
        return atomic_write(path, json.dumps(self.to_dict(), separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TaskSplit:
        """Read a split written by :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise SplitError(
                f"{path} is not a task split ({error}); it was damaged or is another file: "
                "make a new split (a new --output-dir)."
            ) from error
        return cls.from_dict(data)

    def check(self, labels: Sequence[int] | None = None) -> None:
        """Raise :class:`SplitError` unless the split keeps its promises.

        Checked: T tasks paired by group, halves swapped within a pair, no row in both halves,
        class-wise groups disjoint, and (given the dataset ``labels``) every row of a task
        labelled with one of its classes.
        """
        problems: list[str] = []
        if len(self.tasks) != self.num_tasks:
            problems.append(f"{len(self.tasks)} tasks listed, num_tasks is {self.num_tasks}")
        for first, second in zip(self.tasks[::2], self.tasks[1::2], strict=False):
            if first.train != second.heldout or first.heldout != second.train:
                problems.append(f"tasks {first.index} and {second.index} do not swap halves")
            if set(first.train) & set(first.heldout):
                problems.append(f"task {first.index} has rows in both halves")
        seen_classes: set[int] = set()
        seen_rows: set[int] = set()
        for task in self.tasks[::2]:
            if self.mode == "classwise" and seen_classes & set(task.classes):
                problems.append(f"group {task.group} shares classes with another group")
            group_rows = set(task.train) | set(task.heldout)
            if seen_rows & group_rows:
                problems.append(f"group {task.group} shares images with another group")
            seen_classes |= set(task.classes)
            seen_rows |= group_rows
        if labels is not None:
            for task in self.tasks:
                allowed = set(task.classes)
                rows = task.train + task.heldout
                if any(not 0 <= row < len(labels) or labels[row] not in allowed for row in rows):
                    problems.append(f"task {task.index} has rows outside its classes or dataset")
        if problems:
            raise SplitError("invalid task split: " + "; ".join(problems) + ".")


def make_split(
    labels: Sequence[int],
    num_tasks: int = 10,
    group_size: int | None = None,
    *,
    seed: int = 0,
    mode: TaskMode = "classwise",
    class_names: Sequence[str] | None = None,
) -> TaskSplit:
    """Split a labelled dataset into ``num_tasks`` meta-training tasks (METHOD.md).

    Args:
        labels: the label of every dataset row (0..K-1).
        num_tasks: T, even: tasks come in pairs that swap their halves.
        group_size: classes per group; default: as many as the K classes allow (K // (T/2)).
        seed: seed of the class and image shuffles.
        mode: ``"classwise"`` (the paper) or ``"homogeneous"`` (the ablation).
        class_names: names of the K classes, recorded in the split.

    Raises:
        SplitError: T is odd or below 2, a label is negative or beyond ``class_names``, or
            the dataset has too few classes or images for the split; the message says which
            and how many.

    Example:
        >>> split = make_split([0, 0, 1, 1, 2, 2, 3, 3], num_tasks=2, group_size=4)
        >>> split.tasks[0].train == split.tasks[1].heldout
        True
    """
    if mode not in _MODES:
        raise SplitError(f"mode must be one of {_MODES}, got {mode!r}.")
    if num_tasks < 2 or num_tasks % 2:
        raise SplitError(
            f"num_tasks must be even and at least 2 (tasks come in pairs that swap the two "
            f"halves of a group), got {num_tasks}."
        )
    labels = [int(label) for label in labels]
    _check_labels(labels, class_names)
    rows_of: dict[int, list[int]] = {}
    for row, label in enumerate(labels):
        rows_of.setdefault(label, []).append(row)
    present = sorted(rows_of)
    groups = num_tasks // 2
    if group_size is None:
        group_size = len(present) // groups
        if group_size < 2:
            raise SplitError(
                f"{num_tasks} tasks need {groups} groups of at least 2 classes ({2 * groups} "
                f"classes); the dataset has {len(present)}. Lower num_tasks."
            )
    if group_size < 2:
        raise SplitError(
            f"group_size must be at least 2 (a task needs two classes), got {group_size}."
        )
    if groups * group_size > len(present):
        raise SplitError(
            f"{num_tasks} tasks in {groups} groups of {group_size} classes need "
            f"{groups * group_size} classes; the dataset has {len(present)}. Lower num_tasks "
            "or group_size."
        )
    shuffle = random.Random(seed)
    classes = present.copy()
    shuffle.shuffle(classes)
    classes = classes[: groups * group_size]
    # Images of each chosen class, shuffled once; both modes cut these lists.
    pools = {
        label: shuffle.sample(rows_of[label], len(rows_of[label])) for label in sorted(classes)
    }
    parts_needed = 2 if mode == "classwise" else 2 * groups
    short = {label: len(rows) for label, rows in pools.items() if len(rows) < parts_needed}
    if short:
        sample = dict(list(short.items())[:5])
        raise SplitError(
            f"a {mode} split into {num_tasks} tasks needs at least {parts_needed} images of each "
            f"class, and {len(short)} classes have fewer (label: images, first ones: {sample}). "
            "Use more images per class, fewer tasks or the class-wise mode."
        )

    tasks: list[Task] = []
    for group in range(groups):
        if mode == "classwise":
            members = sorted(classes[group * group_size : (group + 1) * group_size])
            first, second = _halve([pools[label] for label in members])
        else:
            members = sorted(classes)
            first, second = _halve([_cut(pools[label], group, groups) for label in members])
        tasks.append(Task(2 * group, group, members, first, second))
        tasks.append(Task(2 * group + 1, group, members, second, first))
    split = TaskSplit(
        mode=mode,
        num_tasks=num_tasks,
        group_size=group_size,
        seed=seed,
        num_images=len(labels),
        tasks=tasks,
        class_names=list(class_names) if class_names is not None else [],
    )
    split.check(labels)
    return split


def _check_labels(labels: list[int], class_names: Sequence[str] | None) -> None:
    """Refuse labels below 0 or beyond the class names: ``local_label_map`` would index them
    from the end or fail, and a task would silently train on the wrong classes."""
    negative = [row for row, label in enumerate(labels) if label < 0]
    if negative:
        raise SplitError(
            f"labels must be 0 or more; {len(negative)} rows have negative labels, first rows "
            f"{negative[:5]}. Drop unlabelled rows before splitting."
        )
    if class_names is not None and labels and max(labels) >= len(class_names):
        beyond = [row for row, label in enumerate(labels) if label >= len(class_names)]
        raise SplitError(
            f"{len(beyond)} rows have labels beyond the {len(class_names)} class names "
            f"(0..{len(class_names) - 1}), first rows {beyond[:5]}."
        )


def _halve(per_class: list[list[int]]) -> tuple[list[int], list[int]]:
    """Halve each class's rows; an odd class gives its extra row to the smaller half so far."""
    first: list[int] = []
    second: list[int] = []
    for rows in per_class:
        half = len(rows) // 2
        if len(rows) % 2 and len(first) < len(second):
            half += 1
        first += rows[:half]
        second += rows[half:]
    return sorted(first), sorted(second)


def _cut(rows: list[int], part: int, parts: int) -> list[int]:
    """Part ``part`` of ``parts`` near-equal consecutive slices of ``rows``."""
    start = len(rows) * part // parts
    stop = len(rows) * (part + 1) // parts
    return rows[start:stop]
