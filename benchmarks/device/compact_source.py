"""Rewrite a parquet split with zstd so that it fits one call to the lent GPU machine.

A call carries 64 MiB at most. Tiny ImageNet's train split (the meta-training source) is 88 MB
as stored, uncompressed parquet; its 100,000 JPEGs repeat the same few hundred header bytes
(quantisation and Huffman tables), which zstd removes: 53 MiB, the same rows in the same order,
the same schema and metadata (checked after writing), so meta-training reads the same images
and draws the same tasks.

    python benchmarks/device/compact_source.py ../shared/data/tiny-imagenet-200-32px .source
                                       # writes .source/tiny-imagenet-200-32px/train.parquet
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pyarrow.parquet as pq


def compact(source: Path, folder: Path, split: str = "train") -> Path:
    table = pq.read_table(source / f"{split}.parquet")
    folder = folder / source.resolve().name  # the dataset's name stays in the recorded path
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.parquet"
    partial = path.with_suffix(".partial")
    pq.write_table(table, partial, compression="zstd", compression_level=19)
    written = pq.read_table(partial)
    if not (written.equals(table) and written.schema.metadata == table.schema.metadata):
        partial.unlink()
        raise SystemExit(f"{path}: the rewritten table differs from {source}; nothing written")
    os.replace(partial, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a folder of <split>.parquet files")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--split", default="train")
    args = parser.parse_args()
    path = compact(args.source, args.folder, args.split)
    print(f"{path} {path.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
