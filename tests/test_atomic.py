"""atomic_write: all of the new file or the old one, never a half-written file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from metaperturb._atomic import atomic_write


def test_writes_text_and_bytes_creating_the_folder(tmp_path: Path) -> None:
    target = atomic_write(tmp_path / "a" / "b.json", '{"x": 1}\n')
    assert target.read_text() == '{"x": 1}\n'
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in target.parent.iterdir()) == ["b.json"]


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    target = atomic_write(tmp_path / "state.json", "old")

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
