"""The few collectives meta-training needs, and the same calls without torch.distributed.

Meta-training shares only phi between tasks, so there is no DistributedDataParallel: each rank
owns some task networks outright, and once per step the ranks sum phi's gradient (one flat
tensor, SUM then divide, which every backend implements). Everything else is object traffic at
log and checkpoint time. :class:`Collective` hides whether a process group exists, so the loop is
one code path from one process to many machines under ``torchrun``.

Under ``torchrun`` the workers also reach the agent's store, which lives as long as the launch and
outlives restarts of the workers. The loop leaves notes there for the attempts after it: that the
run got past its set-up (so a restart may resume it), or that it ended for good (so a restart
must not train again). Work only rank 0 does (writing files) goes through
:meth:`Collective.on_main`, so that every rank learns when it failed.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..errors import LaunchError

__all__ = ["Collective", "LaunchError", "launched_by_torchrun", "session", "task_range"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
#: Where the launch notes live in the agent's store.
_NOTES_PREFIX = "metaperturb/launch"
#: How long a single worker waits for the agent's store before going on without notes.
_AGENT_STORE_TIMEOUT = datetime.timedelta(seconds=30)


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by ``torchrun`` (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def task_range(num_tasks: int, world_size: int, rank: int) -> range:
    """The tasks of ``rank``: a contiguous block, sizes differing by at most one."""
    if world_size > num_tasks:
        raise LaunchError(
            f"{world_size} processes for {num_tasks} tasks: every process needs at least one task. "
            "Start at most as many processes as tasks (torchrun --nproc-per-node / --nnodes)."
        )
    return range(rank * num_tasks // world_size, (rank + 1) * num_tasks // world_size)


@dataclass
class Collective:
    """Rank, world size and device of this process, with collectives that are no-ops alone."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: The store of this torchrun launch, kept across restarts of the workers; None outside
    #: torchrun, or where no store outlives an attempt (see :func:`session`).
    launch_store: Any = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def broadcast_module_(self, module: nn.Module) -> None:
        """Make ``module``'s parameters and float buffers those of rank 0 (one flat tensor)."""
        if not self.distributed:
            return
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        tensors = [*module.parameters(), *buffers]
        if not tensors:
            return
        with torch.no_grad():
            flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])
            dist.broadcast(flat, src=0)
            offset = 0
            for tensor in tensors:
                count = tensor.numel()
                tensor.copy_(flat[offset : offset + count].view_as(tensor))
                offset += count

    def all_reduce_sum_(self, flat: torch.Tensor) -> torch.Tensor:
        """Sum ``flat`` over ranks in place (SUM is supported by every backend, unlike AVG)."""
        if self.distributed:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        return flat

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` on rank 0 (in rank order); ``None`` on the other ranks."""
        if not self.distributed:
            return [value]
        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def on_main(self, work: Callable[[], T]) -> T | None:
        """Run ``work`` on rank 0 only; if it fails there, every rank raises.

        Without this a failure on rank 0 alone (a full disk while writing a checkpoint) ends
        rank 0, and the other ranks wait in the next collective until the timeout, believing
        in a checkpoint that was never written. Returns ``work``'s value on rank 0, None
        elsewhere.
        """
        result: T | None = None
        failure: Exception | None = None
        if self.is_main:
            try:
                result = work()
            except Exception as error:  # noqa: BLE001 - re-raised below, on every rank
                failure = error
        problem = self.broadcast(
            None if failure is None else f"{type(failure).__name__}: {failure}"
        )
        if failure is not None:
            raise failure
        if problem is not None:
            raise RuntimeError(f"rank 0 failed ({problem})")
        return result

    def launch_note(self, key: str) -> str | None:
        """The note ``key`` left earlier in this torchrun launch (by any attempt), or None.

        Best effort: a store that cannot be read counts as no note, with a warning."""
        store = self.launch_store
        if store is None:
            return None
        try:
            return bytes(store.get(key)).decode() if store.check([key]) else None
        except Exception as error:  # noqa: BLE001 - the notes are a refinement, not a need
            logger.warning("could not read %r from torchrun's store (%s)", key, error)
            return None

    def leave_launch_note(self, key: str, value: str) -> None:
        """Leave ``value`` under ``key`` for later attempts of this launch (no-op outside it).

        Best effort, like :meth:`launch_note`: a failure is a warning, not the run's error."""
        if self.launch_store is None:
            return
        try:
            self.launch_store.set(key, value)
        except Exception as error:  # noqa: BLE001
            logger.warning("could not write %r to torchrun's store (%s)", key, error)


def _device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {requested!r} requested but CUDA is not available: use --device cpu "
                "(or auto), or install a CUDA build of torch."
            )
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


@contextmanager
def session(device: str = "auto", timeout_s: float = 1800.0) -> Iterator[Collective]:
    """Join the ``torchrun`` process group if there is one (gloo on CPU, NCCL on CUDA).

    A single process (no ``torchrun``, or ``--nproc-per-node 1``) gets a :class:`Collective` of
    one rank and never touches ``torch.distributed``. The process group is destroyed on exit,
    also after an error, so that ``torchrun --max-restarts`` can start the workers again.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = _device(device, local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    if not launched_by_torchrun():
        store = _agent_store() if _agent_keeps_a_store() else None
        yield Collective(device=resolved, launch_store=_notes(store))
        return
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run a single process.")
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    # torchrun's agent keeps one store across restarts; keys left by the crashed attempt (rank
    # 0's old address, barrier counts) make the next attempt hang or connect to a dead port. A
    # prefix per attempt gives every attempt clean keys.
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    options: dict[str, Any] = {
        "store": dist.PrefixStore(f"metaperturb/attempt-{attempt}", store),
        "rank": rank,
        "world_size": world_size,
        "timeout": timeout,
    }
    if resolved.type == "cuda":
        options["device_id"] = resolved
    dist.init_process_group(backend=backend, **options)
    notes = _notes(store) if _agent_keeps_a_store() else None
    collective = Collective(dist.get_rank(), dist.get_world_size(), resolved, notes)
    logger.info(
        "rank %d of %d on %s (%s)", collective.rank, collective.world_size, resolved, backend
    )
    try:
        yield collective
    finally:
        dist.destroy_process_group()


def _agent_keeps_a_store() -> bool:
    """Whether the workers use the store of torchrun's agent, which outlives their restarts.

    False outside torchrun, and with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` or a rendezvous
    that does not share its store: rank 0 then hosts a new store every attempt.
    """
    return "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get(
        "TORCHELASTIC_USE_AGENT_STORE"
    ) == str(True)


def _agent_store(timeout: datetime.timedelta = _AGENT_STORE_TIMEOUT) -> Any:
    """A client of the agent's store, for a single worker (which has no process group).

    None, with a warning, where it cannot be reached (torchrun's variables inherited by a
    process that outlived its agent): the run goes on without notes rather than wait.
    """
    if not dist.is_available():
        return None
    try:
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    except Exception as error:  # noqa: BLE001 - see the docstring
        logger.warning(
            "torchrun's store at %s:%s cannot be reached (%s); going on without it, so a "
            "restart counts as a resume.",
            os.environ.get("MASTER_ADDR"),
            os.environ.get("MASTER_PORT"),
            error,
        )
        return None
    return store


def _notes(store: Any) -> Any:
    return None if store is None else dist.PrefixStore(_NOTES_PREFIX, store)
