"""``metaperturb train`` with one fault injected, for tests/test_faults.py (not a test itself).

Usage: ``python tests/fault_driver.py TRAIN-ARGS...`` (also as a ``torchrun`` script), with
``METAPERTURB_FAULT`` set to one of:

- ``hang-in-checkpoint-write:N``: the N-th checkpoint write stops half-way through its temporary
  file, touches ``<output>/WRITING`` and sleeps, so that the test can SIGKILL it mid-write.
- ``sigkill-rank:R:S``: rank R SIGKILLs itself at the start of step S (first attempt only).
- ``sigterm-rank:R:S``: rank R sends itself SIGTERM in step S's all-reduce (first attempt only);
  the flag of step S is already sent, so the ranks stop together after step S + 1.
- ``nan-loss:S``: task 0's losses are NaN at step S, in every attempt (a run that diverges).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any


def _hang_in_checkpoint_write(nth: int) -> None:
    from metaperturb import _atomic

    real = _atomic.write_temporary
    calls = 0

    def write(directory: Path, name: str, data: bytes) -> Path:
        nonlocal calls
        if name == "checkpoint.pt":
            calls += 1
            if calls == nth:
                real(directory, name, data[: len(data) // 2])  # a half-written temporary file
                (directory / "WRITING").touch()
                time.sleep(600)
        return real(directory, name, data)

    _atomic.write_temporary = write  # type: ignore[assignment]


def _signal_rank(rank: int, step: int, signum: int = signal.SIGKILL) -> None:
    from metaperturb.train.distributed import Collective

    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return
    real = Collective.all_reduce_sum_
    calls = 0

    def all_reduce(self: Collective, flat: Any) -> Any:
        nonlocal calls
        calls += 1  # once per step
        if self.rank == rank and calls == step:
            os.kill(os.getpid(), signum)
        return real(self, flat)

    Collective.all_reduce_sum_ = all_reduce  # type: ignore[method-assign]


def _nan_loss(step: int) -> None:
    from metaperturb.train.learner import TaskLearner

    real = TaskLearner.step

    def nan_step(self: TaskLearner, index: int, grads: Any) -> Any:
        losses = real(self, index, grads)
        return losses * float("nan") if index == step - 1 and self.task.index == 0 else losses

    TaskLearner.step = nan_step  # type: ignore[method-assign]


def main() -> int:
    kind, _, arguments = os.environ.get("METAPERTURB_FAULT", "").partition(":")
    values = [int(value) for value in arguments.split(":") if value]
    if kind == "hang-in-checkpoint-write":
        _hang_in_checkpoint_write(*values)
    elif kind == "sigkill-rank":
        _signal_rank(*values)
    elif kind == "sigterm-rank":
        _signal_rank(*values, signum=signal.SIGTERM)
    elif kind == "nan-loss":
        _nan_loss(*values)
    elif kind:
        raise SystemExit(f"unknown METAPERTURB_FAULT {kind!r}")
    from metaperturb.train.cli import main as train_main

    return train_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
