"""Hand a lease's work back through $OUT, which returns at most 8 files of 16 MiB each.

    python benchmarks/device/pack.py OUT RESULTS_DIR LOGS_DIR MARKER [--every SECONDS]

``checks.tar`` holds LOGS_DIR; ``results-<k>.tar`` (k < 6) hold every file of RESULTS_DIR
changed since MARKER's time (run results, checkpoints of unfinished runs), filled up to 15 MiB
each. Each tar is written beside its name and renamed, so a call cut off mid-pack still returns
the previous complete set. With ``--every``, packs again every SECONDS until stopped.
"""

from __future__ import annotations

import argparse
import os
import tarfile
import time
from pathlib import Path

LIMIT = 15 * 2**20
RESULT_TARS = 6


def bins(files: list[Path]) -> list[list[Path]]:
    """First-fit, largest first, into at most RESULT_TARS bins of LIMIT bytes (extra files are
    left out with a note; a lease makes a few dozen files of a few MB)."""
    packed: list[tuple[int, list[Path]]] = []
    for path in sorted(files, key=lambda p: p.stat().st_size, reverse=True):
        size = path.stat().st_size
        for k, (used, members) in enumerate(packed):
            if used + size <= LIMIT:
                packed[k] = (used + size, [*members, path])
                break
        else:
            if len(packed) == RESULT_TARS:
                print(f"pack: no room for {path.name} ({size} bytes)", flush=True)
                continue
            packed.append((size, [path]))
    return [members for _, members in packed]


def write_tar(target: Path, members: list[Path]) -> None:
    partial = target.with_suffix(".partial")
    with tarfile.open(partial, "w") as tar:
        for path in members:
            try:
                tar.add(path)
            except FileNotFoundError:  # a checkpoint replaced by its result meanwhile
                continue
    os.replace(partial, target)


def pack(out: Path, results: Path, logs: Path, since: float) -> None:
    write_tar(out / "checks.tar", [p for p in sorted(logs.iterdir()) if p.is_file()])
    changed = [
        p
        for p in results.iterdir()
        if p.is_file() and p.suffix in (".json", ".ckpt") and p.stat().st_mtime >= since
    ]
    groups = bins(changed)
    for k, members in enumerate(groups):
        write_tar(out / f"results-{k}.tar", members)
    for k in range(len(groups), RESULT_TARS):
        (out / f"results-{k}.tar").unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("results", type=Path)
    parser.add_argument("logs", type=Path)
    parser.add_argument("marker", type=Path)
    parser.add_argument("--every", type=float)
    args = parser.parse_args()
    since = args.marker.stat().st_mtime
    while True:
        pack(args.out, args.results, args.logs, since)
        if args.every is None:
            return
        time.sleep(args.every)


if __name__ == "__main__":
    main()
