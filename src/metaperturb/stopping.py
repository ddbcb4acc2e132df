"""Stop a training run on a signal without losing its steps.

A run killed by SIGTERM (how a sweep, torchrun, a scheduler or a session's end stops it) loses
everything since its last periodic checkpoint. With :func:`stop_on_signals` the first SIGTERM or
Ctrl-C only asks: the run finishes the step it is in, writes a checkpoint at that step and raises
:class:`~metaperturb.errors.TrainingStoppedError` (an evaluation run's test pass, whose trained
network is already checkpointed, stops between batches; the ranks of a distributed meta-training
run agree on the step through the gradient all-reduce). A second signal ends the process at once.
Used by ``metaperturb train``, ``metaperturb eval`` and ``benchmarks/transfer.py``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["stop_on_signals"]


@contextlib.contextmanager
def stop_on_signals(
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
) -> Iterator[threading.Event]:
    """An event that ``signals`` set, for ``train(config, stop=event)`` or
    ``run_transfer(..., stop=event)``; the previous handlers come back on exit. Outside the main
    thread (where Python cannot handle signals) the event is returned unconnected."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def ask(signum: int, frame: Any) -> None:
        if stop.is_set():  # asked twice: stop now
            raise SystemExit(128 + signum)
        stop.set()

    previous = {sig: signal.signal(sig, ask) for sig in signals}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
