"""Checks on the README and docs that would otherwise go stale without a sound.

They link to each other's sections and to result files: when a section moves (the README's
evaluation and performance sections went to docs/), a link left behind breaks. Every relative
link must name a file that exists and, for a Markdown file, a heading in it (GitHub's anchors:
lower case, punctuation dropped, spaces as hyphens). And the reliability headline counts the
rows of its own tables."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("docs/*.md"))]
DOCUMENTS += ["weights/phi-star/README.md"]


def anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {
        anchor(match.group(1))
        for match in re.finditer(r"^#{1,6} (.+)$", _prose(path.read_text()), re.MULTILINE)
    }


def _prose(text: str) -> str:
    """The text without its fenced code blocks (a shell comment is not a heading)."""
    return re.sub(r"```.*?```", "", text, flags=re.DOTALL)


def test_anchors_follow_githubs_rule() -> None:
    assert anchor("phi\\* collapses ResNet-20 on Omniglot-100") == (
        "phi-collapses-resnet-20-on-omniglot-100"
    )
    assert anchor("Choices that differ from the authors' code") == (
        "choices-that-differ-from-the-authors-code"
    )


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_relative_link_reaches_its_file_and_heading(document: str) -> None:
    path = ROOT / document
    broken = []
    for match in re.finditer(r"\]\(([^)\s]+)\)", _prose(path.read_text())):
        target = match.group(1)
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, heading = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif heading and linked.suffix == ".md" and heading not in anchors(linked):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{document}: broken links: {broken}"


def test_the_reliability_headline_counts_the_rows_of_its_tables() -> None:
    text = (ROOT / "docs" / "reliability.md").read_text()
    inputs = len(re.findall(r"^\| \d+ \|", text, re.MULTILINE))
    faults = len(re.findall(r"^\| F\d+ \|", text, re.MULTILINE))
    headline = f"**{inputs} bad inputs, {faults} injected faults"
    assert headline in text, f"docs/reliability.md should open with {headline!r}"
    assert f"**{inputs} bad inputs, {faults} injected faults (" in (ROOT / "README.md").read_text()
