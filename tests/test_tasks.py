"""The class-wise task split of METHOD.md: disjoint class groups, halves swapped, no row twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metaperturb.tasks import SplitError, TaskSplit, make_split

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = DATA / "tiny-imagenet-200-32px" / "train.parquet"


def _labels(classes: int, per_class: int) -> list[int]:
    return [row % classes for row in range(classes * per_class)]


def test_classwise_groups_are_disjoint_and_halves_swap() -> None:
    labels = _labels(12, 10)
    split = make_split(labels, num_tasks=4, group_size=5, seed=3)
    assert split.num_tasks == 4 and len(split.tasks) == 4
    groups = [set(task.classes) for task in split.tasks[::2]]
    assert all(len(group) == 5 for group in groups) and not groups[0] & groups[1]
    for first, second in zip(split.tasks[::2], split.tasks[1::2], strict=True):
        assert first.classes == second.classes and first.group == second.group
        assert first.train == second.heldout and first.heldout == second.train
        assert not set(first.train) & set(first.heldout)
        rows = first.train + first.heldout
        # Every image of the group's classes, each in exactly one half.
        assert sorted(rows) == [r for r, label in enumerate(labels) if label in first.classes]
        for label in first.classes:  # halved class by class
            assert sum(labels[r] == label for r in first.train) == 5
    assert {labels[r] for r in split.tasks[0].train} == set(split.tasks[0].classes)


def test_default_group_size_uses_as_many_classes_as_possible() -> None:
    split = make_split(_labels(11, 4), num_tasks=4)
    assert split.group_size == 5
    assert sum(len(task.classes) for task in split.tasks[::2]) == 10


def test_seed_changes_the_split_and_is_reproducible() -> None:
    labels = _labels(20, 6)
    assert make_split(labels, 4, seed=1) == make_split(labels, 4, seed=1)
    assert make_split(labels, 4, seed=1).tasks != make_split(labels, 4, seed=2).tasks


def test_homogeneous_tasks_share_classes_and_divide_images() -> None:
    labels = _labels(6, 8)
    split = make_split(labels, num_tasks=4, seed=0, mode="homogeneous")
    assert all(task.classes == list(range(6)) for task in split.tasks)
    rows = [set(task.train) | set(task.heldout) for task in split.tasks[::2]]
    assert not rows[0] & rows[1] and len(rows[0]) == len(rows[1]) == 24
    assert len(split.tasks[0].train) == len(split.tasks[0].heldout) == 12


def test_local_label_map() -> None:
    task = make_split(_labels(4, 4), num_tasks=2, seed=0).tasks[0]
    mapping = task.local_label_map(4)
    assert [mapping[label] for label in task.classes] == list(range(4))


@pytest.mark.parametrize(
    ("labels", "kwargs", "message"),
    [
        (_labels(8, 4), {"num_tasks": 3}, "must be even"),
        (_labels(8, 4), {"num_tasks": 0}, "must be even"),
        (_labels(8, 4), {"num_tasks": 6, "group_size": 3}, "need 9 classes; the dataset has 8"),
        (_labels(5, 4), {"num_tasks": 6}, "at least 2 classes"),
        (_labels(8, 4), {"num_tasks": 2, "group_size": 1}, "at least 2"),
        ([0, 0, 1, 2, 2], {"num_tasks": 2}, "at least 2 images of each class"),
        (_labels(4, 3), {"num_tasks": 4, "mode": "homogeneous"}, "at least 4 images"),
        (_labels(4, 3), {"num_tasks": 2, "mode": "other"}, "mode must be one of"),
    ],
)
def test_impossible_splits_say_why(labels: list[int], kwargs: dict, message: str) -> None:
    with pytest.raises(SplitError, match=message):
        make_split(labels, **kwargs)


def test_json_round_trip(tmp_path: Path) -> None:
    split = make_split(_labels(6, 4), num_tasks=2, seed=5, class_names=list("abcdef"))
    path = split.save(tmp_path / "split.json")
    assert TaskSplit.load(path) == split
    assert json.loads(path.read_text())["class_names"] == list("abcdef")
    data = split.to_dict() | {"format_version": 99}
    with pytest.raises(SplitError, match="format version"):
        TaskSplit.from_dict(data)
    path.write_text(path.read_text()[:40])  # cut short by something other than save
    with pytest.raises(SplitError, match="is not a task split"):
        TaskSplit.load(path)


def test_check_catches_a_broken_split() -> None:
    split = make_split(_labels(6, 4), num_tasks=2, seed=0)
    split.tasks[1].train = split.tasks[1].train[1:]
    with pytest.raises(SplitError, match="do not swap halves"):
        split.check()


@settings(max_examples=40, deadline=None)
@given(
    classes=st.integers(2, 12),
    per_class=st.integers(2, 9),
    pairs=st.integers(1, 3),
    seed=st.integers(0, 10**6),
    homogeneous=st.booleans(),
)
def test_split_properties(
    classes: int, per_class: int, pairs: int, seed: int, homogeneous: bool
) -> None:
    labels = _labels(classes, per_class)
    mode = "homogeneous" if homogeneous else "classwise"
    try:
        split = make_split(labels, num_tasks=2 * pairs, seed=seed, mode=mode)
    except SplitError:
        assert classes < 2 * pairs or (homogeneous and per_class < 2 * pairs)
        return
    split.check(labels)  # raises on any broken promise
    for task in split.tasks:
        assert task.train and task.heldout
        assert abs(len(task.train) - len(task.heldout)) <= 1


@pytest.mark.skipif(not TINY.is_file(), reason=f"{TINY} not present")
def test_authors_split_of_tiny_imagenet() -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    labels = pq.read_table(TINY, columns=["label"]).column("label").to_pylist()
    split = make_split(labels, num_tasks=10, seed=0)
    assert split.group_size == 40
    assert sorted(c for task in split.tasks[::2] for c in task.classes) == list(range(200))
    assert all(len(task.train) == len(task.heldout) == 10_000 for task in split.tasks)
