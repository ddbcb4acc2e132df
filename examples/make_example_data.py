"""Cut the small Fashion-MNIST that ships in ``examples/data/fashion-mnist-small/``.

The quickstart must run on a fresh machine with no download, so the repository carries a tiny,
freely licensed (MIT) dataset: the first 300 images of each class from the train split (3,000)
and the first 100 of each class from the test split (1,000), in source order. The parquet layout
and the ``huggingface`` schema metadata (Image and ClassLabel features with the class names) are
kept, so ``datasets.load_dataset("parquet", ...)`` still decodes images and names the labels.
The cut is deterministic: rerunning it rewrites the same rows.

Usage:
    python examples/make_example_data.py [--source ../shared/data/fashion-mnist] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "fashion-mnist"
DEFAULT_OUT = REPO / "examples" / "data" / "fashion-mnist-small"
PER_CLASS = {"train": 300, "test": 100}


def first_per_class(table: pa.Table, per_class: int) -> pa.Table:
    """Keep the first ``per_class`` rows of each label, in the source order (deterministic)."""
    counts: dict[int, int] = {}
    keep: list[int] = []
    for index, label in enumerate(table.column("label").to_pylist()):
        if counts.get(label, 0) < per_class:
            counts[label] = counts.get(label, 0) + 1
            keep.append(index)
    short = {label: n for label, n in counts.items() if n < per_class}
    if short:
        raise ValueError(f"classes with fewer than {per_class} images: {short}")
    return table.take(pa.array(keep, type=pa.int64()))


def cut_split(source: Path, out: Path, split: str, per_class: int) -> pa.Table:
    """Cut one split and write it with the source's HF metadata and a new ``source`` note."""
    table = pq.read_table(source / f"{split}.parquet")
    small = first_per_class(table, per_class)
    metadata = dict(table.schema.metadata or {})
    if b"huggingface" not in metadata:
        raise ValueError(f"{source / split}.parquet has no 'huggingface' schema metadata")
    names = json.loads(metadata[b"huggingface"])["info"]["features"]["label"]["names"]
    metadata[b"source"] = (
        f"Fashion-MNIST (MIT, Zalando Research), 28px grayscale PNG; {split}: the first "
        f"{per_class} images of each of the {len(names)} classes of the {split} split, "
        "cut by examples/make_example_data.py"
    ).encode()
    small = small.replace_schema_metadata(metadata)
    out.mkdir(parents=True, exist_ok=True)
    # PNG bytes do not compress further; one row group keeps the file small and simple.
    # Written beside, then moved into place: a stopped run never leaves half a parquet file.
    partial = out / f"{split}.parquet.partial"
    pq.write_table(small, partial, row_group_size=len(small), compression="zstd")
    os.replace(partial, out / f"{split}.parquet")
    return small


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        type=Path,
        default=DEFAULT_SOURCE,
        help="folder holding the full fashion-mnist train.parquet and test.parquet "
        f"(default: {DEFAULT_SOURCE})",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    for split, per_class in PER_CLASS.items():
        small = cut_split(args.source, args.out, split, per_class)
        size = (args.out / f"{split}.parquet").stat().st_size
        print(f"{split}: {small.num_rows} images, {size / 1e6:.2f} MB -> {args.out}")


if __name__ == "__main__":
    main()
