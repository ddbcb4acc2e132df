"""The meta-training loop: T task networks share one trainable phi (METHOD.md, Algorithm 1).

Each step, every task updates its own network on a train batch and adds phi's gradient on a
held-out batch to a sum; the sum is all-reduced over ranks, divided by T, and phi takes one Adam
step. The same code runs in one process and under ``torchrun`` (see :mod:`.distributed`).

A run lives in one folder::

    train_config.json   the TrainConfig
    split.json          the task split (dataset rows of every task)
    metrics.jsonl       the metrics log (see :mod:`.metrics`)
    checkpoint.pt       the latest checkpoint (see :mod:`.checkpoint`)
    phi/                the result: save_pretrained's folder, ready for wrap(model, phi=...)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

import torch
from tqdm.auto import tqdm

from .._atomic import atomic_write
from .._machine import describe, flush_denormals, label, with_segment
from ..data import BadImagePolicy, ImageData, load_images
from ..errors import MetaPerturbError, RunExistsError, SplitError, TrainingStoppedError
from ..phi import Perturbation, PerturbationConfig
from ..tasks import TaskMode, TaskSplit, make_split
from . import checkpoint
from .config import RESUMABLE_CHANGES, TrainConfig
from .distributed import Collective, session, task_range
from .learner import TaskLearner
from .metrics import MetricsLog, noise_path_alive, phi_magnitudes, site_scales, summarize
from .sampling import TaskStream, derive_seed

__all__ = ["RunExistsError", "TrainingStoppedError", "train"]

logger = logging.getLogger(__name__)

CONFIG_NAME = "train_config.json"
SPLIT_NAME = "split.json"
METRICS_NAME = "metrics.jsonl"
PHI_DIRNAME = "phi"
_PHI_KEY = 3
#: Testing hook: a worker of the first torchrun attempt exits at this step, to test restarts.
_CRASH_ENV = "_METAPERTURB_TEST_CRASH_AT_STEP"
#: Launch notes (see :class:`.distributed.Collective`), one of each per output folder: the run
#: got past its set-up in this torchrun launch, so a restart resumes it; the run ended for good,
#: so a restart does not train.
_SET_UP_NOTE = "set-up"
_FINAL_NOTE = "final"


def train(config: TrainConfig, stop: threading.Event | None = None) -> Path:
    """Meta-train phi as ``config`` says; returns the folder phi was saved to.

    Run it as one process, or as several under ``torchrun`` (each process takes a block of the
    tasks). Under ``torchrun --max-restarts``, restarted workers resume from the checkpoint, but
    only a run that got past its set-up in this launch: a refusal (the folder holds another run,
    ``--resume`` without a checkpoint) is repeated by every restart. A stop that was asked for
    and a divergence are final: workers restarted after them repeat the error without
    training. These rules rest on notes in torchrun's store, per output folder and worker
    process; where no store outlives the workers (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``),
    any restart counts as a resume.
    ``stop`` (e.g. from :func:`~metaperturb.stopping.stop_on_signals`), once set on any rank,
    ends the loop after the step in progress: every rank stops at that step, a checkpoint of it
    is written and :class:`TrainingStoppedError` says to resume.

    Raises:
        RunExistsError: the output folder holds a checkpoint and ``config.resume`` is false.
        CheckpointError: ``config.resume`` and no usable checkpoint, or settings that differ
            from the checkpoint's (other than those in ``RESUMABLE_CHANGES``).
        DataError, SplitError: the data cannot be loaded or split as asked.
        TrainingStoppedError: the loop stopped part-way (asked to, another rank died or timed
            out, a write failed); the message names the last checkpoint and says how to resume.

    Example:
        >>> from metaperturb.train import TrainConfig, train
        >>> phi_dir = train(TrainConfig(data="../shared/data/tiny-imagenet-200-32px"))  # doctest: +SKIP
    """
    if config.flush_denormal:  # before any parallel operation starts torch's threads
        flush_denormals()
    with session(config.device, config.dist_timeout) as comm:
        ended = comm.broadcast(_final_note(comm, Path(config.output_dir)) if comm.is_main else None)
        if ended is not None:
            raise TrainingStoppedError(
                ended["message"] + " (torchrun restarted the workers after that; they did not "
                "train again)",
                asked=ended["asked"],
            )
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        return _MetaTrainer(config, comm, stop).run()


def _restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _this_worker() -> dict[str, Any]:
    """Who leaves a note: a note of this very process (a script calling ``train`` twice) is
    not an earlier attempt's."""
    return {"worker": f"{socket.gethostname()}:{os.getpid()}", "attempt": _restart_count()}


def _note_key(name: str, output: Path) -> str:
    return f"{name}:{output.resolve()}"


def _earlier_note(comm: Collective, name: str, output: Path) -> dict[str, Any] | None:
    """The note ``name`` about ``output`` that another worker process left in this launch."""
    text = comm.launch_note(_note_key(name, output))
    if text is None:
        return None
    note = json.loads(text)
    return None if note["worker"] == _this_worker()["worker"] else cast(dict[str, Any], note)


def _restart_of_this_run(comm: Collective, output: Path) -> bool:
    """Whether these are restarted workers of a run that got past its set-up in this launch.

    Only then may they resume without ``--resume``. Counting every restart instead would let
    the restart after a refusal (a folder holding another run) resume that run silently. The
    note also covers workers that torchrun restarts without counting (an elastic membership
    change).
    """
    if comm.launch_store is None:  # nothing outlives an attempt: trust the count
        return _restart_count() > 0
    return _earlier_note(comm, _SET_UP_NOTE, output) is not None


def _final_note(comm: Collective, output: Path) -> dict[str, Any] | None:
    """The end an earlier attempt of this launch declared final, if torchrun restarted the
    workers after it (a failure, counted). Workers restarted for a membership change (not
    counted) ended by the agent's SIGTERM, which looked like a stop: they go on."""
    note = _earlier_note(comm, _FINAL_NOTE, output)
    return note if note is not None and _restart_count() > note["attempt"] else None


class _MetaTrainer:
    """The state of one run on one rank; :meth:`run` is the loop."""

    def __init__(
        self, config: TrainConfig, comm: Collective, stop: threading.Event | None = None
    ) -> None:
        self.comm = comm
        self.stop = stop
        self.output = Path(config.output_dir)
        self.resumed = self._resume_payload(config)
        self.resumed_from = None if self.resumed is None else int(self.resumed["step"])
        if self.resumed is not None:
            saved = TrainConfig.from_dict(self.resumed["config"])
            changes = {name: getattr(config, name) for name in RESUMABLE_CHANGES}
            config = dataclasses.replace(saved, **changes)
        if config.channels_last is None:  # decided once, recorded in the run's config
            config = dataclasses.replace(
                config, channels_last=config.resolved_channels_last(comm.device)
            )
        self.config = config
        self.data = load_images(
            config.data,
            config.split,
            image_size=config.image_size,
            channels=config.channels,
            classes=config.classes,
            max_per_class=config.max_per_class,
            on_bad_image=cast(BadImagePolicy, config.on_bad_image),  # checked by TrainConfig
            cache_dir=config.cache_dir,
        )
        self.split = self._split()
        if self.resumed is not None:
            self.mean, self.std = self.resumed["normalization"]
        else:
            self.mean, self.std = self.data.channel_stats()
        if self.resumed is None:
            comm.on_main(self._write_run_files)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(config.seed, _PHI_KEY))
            self.phi = Perturbation(
                PerturbationConfig(clip=config.clip, placement=config.placement)
            )
        self.phi.to(comm.device)
        comm.broadcast_module_(self.phi)  # identical phi on every rank, whatever happened before
        self.phi_optimizer = torch.optim.Adam(
            self.phi.parameters(), lr=config.phi_lr, weight_decay=config.phi_weight_decay
        )
        self.learners = self._learners(self.data)
        #: Every rank's machine (rank 0; None elsewhere) and the launches that trained the run
        #: before this one: a part trained on another kind of CPU took another floating-point
        #: path (:mod:`metaperturb._machine`), so the record says which steps ran where.
        self.machines = comm.gather(describe(comm.device, bool(config.channels_last)))
        self.segments: list[dict[str, Any]] = []
        self.start = 0
        self.last_record: dict[str, Any] | None = None
        #: The step of the last checkpoint this rank knows of (rank 0: written and renamed).
        self.checkpointed = self.resumed_from
        if self.resumed is not None:
            self._restore(self.resumed)
            self.resumed = None  # free the memory
        self.step = self.start  # the step being taken, for messages
        if comm.is_main:
            comm.leave_launch_note(_note_key(_SET_UP_NOTE, self.output), json.dumps(_this_worker()))

    # -- set-up -----------------------------------------------------------------------------

    def _resume_payload(self, config: TrainConfig) -> dict[str, Any] | None:
        """The checkpoint to continue from (rank 0 reads it, every rank receives it)."""
        path = self.output / checkpoint.CHECKPOINT_NAME
        exists, payload, problem, restarted = False, None, None, False
        if self.comm.is_main:
            exists = path.is_file()
            restarted = _restart_of_this_run(self.comm, self.output)
            if exists and (config.resume or restarted):
                try:
                    payload = checkpoint.load(path)
                except checkpoint.CheckpointError as error:
                    problem = str(error)
        exists, payload, problem, restarted = self.comm.broadcast(
            (exists, payload, problem, restarted)
        )
        if problem is not None:
            raise checkpoint.CheckpointError(problem)
        if payload is not None:
            self.comm.on_main(self._remove_temporaries)
        if exists and payload is None:
            raise RunExistsError(
                f"{self.output} already holds a run ({path.name}). Pass --resume to continue it, "
                "or choose another --output-dir."
            )
        if config.resume and not exists and not restarted:
            raise checkpoint.CheckpointError(
                f"--resume: no checkpoint in {self.output} to continue from; check "
                "--output-dir, or drop --resume to start a new run there."
            )
        if payload is not None:
            saved = TrainConfig.from_dict(payload["config"])
            differences = saved.differences(config)
            if differences:
                raise checkpoint.CheckpointError(
                    f"the settings differ from the checkpoint in {self.output} ("
                    + "; ".join(differences)
                    + "). Resume with the run's settings (only "
                    + ", ".join(sorted(RESUMABLE_CHANGES))
                    + " may change), or start a new --output-dir."
                )
            if config.steps < payload["step"]:
                raise checkpoint.CheckpointError(
                    f"--steps {config.steps} is below the checkpoint's step {payload['step']}: "
                    "a resumed run can only continue forward."
                )
            logger.info("resuming %s from step %d", self.output, payload["step"])
        return payload

    def _remove_temporaries(self) -> None:
        for stale in checkpoint.remove_temporaries(self.output):
            logger.warning("removed %s, a checkpoint the stopped run left half-written", stale)

    def _split(self) -> TaskSplit:
        config = self.config
        if self.resumed is not None:
            split = TaskSplit.from_dict(self.resumed["split"])
            self._check_same_data(split)
            return split
        return make_split(
            self.data.labels.tolist(),
            config.num_tasks,
            config.group_size,
            seed=config.task_seed,
            mode=cast(TaskMode, config.task_mode),  # checked by TrainConfig
            class_names=self.data.class_names,
        )

    def _check_same_data(self, split: TaskSplit) -> None:
        """Refuse to resume on data other than the run's: same rows, class names and labels."""
        data, problem = self.data, None
        if split.num_images != len(data):
            problem = f"indexes {split.num_images} images, the data now has {len(data)}"
        elif split.class_names and split.class_names != list(data.class_names):
            problem = (
                f"names the classes {_preview(split.class_names)}, the data now names them "
                f"{_preview(list(data.class_names))}"
            )
        else:
            try:
                split.check(data.labels.tolist())
            except SplitError as error:
                problem = f"does not fit the data's labels ({error})"
        if problem is not None:
            raise checkpoint.CheckpointError(
                f"the checkpoint's task split {problem}: {self.config.data!r} is not the "
                "dataset the run was started on. Resume with the run's original --data, or "
                "start a new --output-dir."
            )

    def _write_run_files(self) -> None:
        atomic_write(self.output / CONFIG_NAME, json.dumps(self.config.to_dict(), indent=2) + "\n")
        self.split.save(self.output / SPLIT_NAME)

    def _learners(self, data: ImageData) -> list[TaskLearner]:
        config, device = self.config, self.comm.device
        images = data.images.to(device)
        size = (config.channels, config.image_size, config.image_size)
        learners = []
        for index in task_range(self.split.num_tasks, self.comm.world_size, self.comm.rank):
            task = self.split.tasks[index]
            local = torch.tensor(task.local_label_map(data.num_classes))[data.labels]
            streams = [
                TaskStream(
                    images,
                    local,
                    rows,
                    config.batch_size,
                    (config.seed, index, half),
                    padding=config.padding,
                    flip=config.flip,
                    mean=self.mean,
                    std=self.std,
                )
                for half, rows in enumerate((task.train, task.heldout))
            ]
            learners.append(
                TaskLearner(
                    task,
                    self.phi,
                    streams[0],
                    streams[1],
                    model_name=config.model,
                    input_size=size,
                    lr=config.lr,
                    weight_decay=config.weight_decay,
                    seed=config.seed,
                    sites=config.sites,
                    placement=config.placement,
                    device=device,
                    channels_last=bool(config.channels_last),
                )
            )
        return learners

    def _restore(self, payload: dict[str, Any]) -> None:
        self.phi.load_state_dict(payload["phi"])
        self.phi_optimizer.load_state_dict(payload["phi_optimizer"])
        for learner in self.learners:
            learner.load_state_dict(payload["tasks"][learner.task.index])
        states = payload["rng"]
        if self.comm.rank < len(states):
            torch.set_rng_state(states[self.comm.rank]["cpu"])
            if self.comm.device.type == "cuda" and states[self.comm.rank]["cuda"] is not None:
                torch.cuda.set_rng_state(states[self.comm.rank]["cuda"], self.comm.device)
        self.start = int(payload["step"])
        self.last_record = payload["metrics"]
        # Absent from checkpoints written before 2026-12-07: their part is "not recorded".
        self.segments = payload.get("segments") or [
            {"from_step": 0, "to_step": self.start, "machines": None}
        ]

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> Path:
        """The loop; any failure in it becomes a :class:`TrainingStoppedError` naming the last
        checkpoint, so that a crashed rank or a full disk ends with a way to continue."""
        try:
            return self._run()
        except MetaPerturbError:
            raise
        except Exception as error:
            raise TrainingStoppedError(self._stopped(error)) from error

    def _stopped(self, error: BaseException) -> str:
        if self.checkpointed is None:
            resume = "no checkpoint was written yet: rerun the same command to start over"
        else:
            holder = "" if self.comm.is_main else " (on rank 0's machine)"
            resume = (
                f"the checkpoint of step {self.checkpointed} in {self.output}{holder} is intact: "
                "fix the cause and rerun the same command with --resume to continue from it"
            )
            if self.comm.distributed:
                resume += " (torchrun --max-restarts N does this by itself)"
        return (
            f"meta-training stopped at step {self.step + 1} of {self.config.steps} "
            f"({type(error).__name__}: {error}); {resume}."
        )

    def _diverged(self, step: int, bad_losses: int) -> str:
        """The message for a step whose losses or phi gradient were not finite: phi did not take
        that step and nothing of it was saved."""
        if self.checkpointed is None:
            resume = "no checkpoint was written yet"
        else:
            resume = (
                f"the checkpoint of step {self.checkpointed} in {self.output} is intact (resuming "
                "it repeats the same steps, so it would diverge again)"
            )
        what = (
            f"{bad_losses} of the tasks' train and held-out losses were not finite"
            if bad_losses
            else "phi's gradient was not finite"
        )
        return (
            f"meta-training diverged at step {step} of {self.config.steps}: {what}; phi was "
            f"not updated and nothing from this step was saved, and {resume}. "
            "Start a new --output-dir with a lower --phi-lr or --lr, or a --clip if it is off."
        )

    def _final(self, message: str, *, asked: bool) -> TrainingStoppedError:
        """The error that ends the run for good in this launch: a torchrun restart would undo
        a stop that was asked for, or diverge again at the same step, so the note left here
        makes restarted workers repeat the error instead of training."""
        if self.comm.is_main:
            note = {"message": message, "asked": asked, **_this_worker()}
            self.comm.leave_launch_note(_note_key(_FINAL_NOTE, self.output), json.dumps(note))
        return TrainingStoppedError(message, asked=asked)

    def _run(self) -> Path:
        config, comm = self.config, self.comm
        metrics = comm.on_main(self._open_metrics)
        parameters = list(self.phi.parameters())
        sizes = [p.numel() for p in parameters]
        crash_at = int(os.environ.get(_CRASH_ENV, "0")) if _restart_count() == 0 else 0
        bar = tqdm(
            total=config.steps,
            initial=self.start,
            unit="step",
            disable=not (config.progress and comm.is_main),
            dynamic_ncols=True,
        )
        clock, clock_step = time.perf_counter(), self.start
        # Elapsed time counts the earlier attempts of a resumed run too.
        started = clock - (self.last_record or {}).get("elapsed_s", 0.0)
        for step in range(self.start, config.steps):
            self.step = step
            grads = [torch.zeros_like(p) for p in parameters]
            losses = torch.stack([learner.step(step, grads) for learner in self.learners])
            # A stop asked on any rank, and the count of non-finite losses, ride on the
            # gradient's all-reduce as two more numbers, so every rank sees the same sums and
            # stops after the same step; one host-device sync reads them all.
            asked = self.stop is not None and self.stop.is_set()
            asked_flag = grads[0].new_full((1,), float(asked))
            bad_losses = (~torch.isfinite(losses)).sum().reshape(1).to(asked_flag)
            summed = comm.all_reduce_sum_(
                torch.cat([*(g.reshape(-1) for g in grads), asked_flag, bad_losses])
            )
            flat = summed[:-2]
            stop_votes, nonfinite_losses, nonfinite_grads = torch.cat(
                [summed[-2:], (~torch.isfinite(flat)).sum().reshape(1).to(flat)]
            ).tolist()
            if nonfinite_losses or nonfinite_grads:
                bar.close()
                raise self._final(self._diverged(step + 1, int(nonfinite_losses)), asked=False)
            stopping = stop_votes > 0
            flat.div_(self.split.num_tasks)
            for parameter, grad in zip(parameters, flat.split(sizes), strict=True):
                parameter.grad = grad.view_as(parameter)
            self.phi_optimizer.step()
            self.phi_optimizer.zero_grad(set_to_none=True)
            done = step + 1
            bar.update(1)
            if done % config.log_every == 0 or done == config.steps:
                now = time.perf_counter()
                record = self._log(
                    done, now - started, (done - clock_step) / (now - clock), metrics
                )
                clock, clock_step = now, done
                if record is not None:
                    mean = record["mean"]
                    bar.set_postfix(
                        heldout_loss=f"{mean['heldout_loss']:.3f}",
                        heldout_acc=f"{mean['heldout_acc']:.3f}",
                    )
            if done == crash_at and comm.rank == comm.world_size - 1:
                logger.error("%s=%d: exiting on purpose to test a restart", _CRASH_ENV, done)
                os._exit(17)
            if (config.checkpoint_every and done % config.checkpoint_every == 0) or (
                done == config.steps
            ):
                self._checkpoint(done)
            if stopping and done < config.steps:
                bar.close()
                if self.checkpointed != done:
                    try:
                        self._checkpoint(done)
                    except Exception as error:  # the stop holds, at the last good checkpoint
                        raise self._final(self._stopped(error), asked=True) from error
                raise self._final(
                    f"meta-training stopped at step {done} of {config.steps} as asked; the "
                    f"checkpoint of step {done} in {self.output} holds it: rerun the same command "
                    "with --resume to continue.",
                    asked=True,
                )
        bar.close()
        target = self.output / PHI_DIRNAME
        comm.on_main(lambda: self._save_phi(target))
        return target

    def _open_metrics(self) -> MetricsLog:
        self.output.mkdir(parents=True, exist_ok=True)
        return MetricsLog(self.output / METRICS_NAME, self.resumed_from)

    def _log(
        self, step: int, elapsed: float, rate: float, metrics: MetricsLog | None
    ) -> dict[str, Any] | None:
        """Gather the tasks' records; rank 0 checks phi, summarizes and writes them (a failure
        there stops every rank). Returns the record on rank 0, None elsewhere."""
        tasks = {
            learner.task.index: {
                **learner.meter.collect(),
                "scale": site_scales(learner.model),
                "noise_alive": noise_path_alive(
                    learner.model, learner.heldout_stream.batch(step)[0][:32]
                ),
            }
            for learner in self.learners
        }
        phi = torch.cat([p.detach().reshape(-1).cpu() for p in self.phi.parameters()])
        gathered = self.comm.gather({"tasks": tasks, "phi": phi})
        return self.comm.on_main(lambda: self._record(step, elapsed, rate, gathered, phi, metrics))

    def _record(
        self,
        step: int,
        elapsed: float,
        rate: float,
        gathered: list[Any] | None,
        phi: torch.Tensor,
        metrics: MetricsLog | None,
    ) -> dict[str, Any]:
        assert gathered is not None and metrics is not None  # rank 0
        # Every rank took the same optimizer steps from the same all-reduced gradient: a phi
        # that differs anywhere means the ranks no longer train one phi. Stop rather than
        # publish it.
        diverged = [rank for rank, part in enumerate(gathered) if not torch.equal(part["phi"], phi)]
        if diverged:
            raise RuntimeError(f"phi differs between rank 0 and ranks {diverged} at step {step}.")
        merged = {task: record for part in gathered for task, record in part["tasks"].items()}
        record = {"step": step, "elapsed_s": round(elapsed, 3), "steps_per_s": rate}
        self.last_record = {
            **record,
            **summarize(merged),
            "phi": phi_magnitudes(self.phi),
            "ranks": self.comm.world_size,
        }
        alive = self.last_record["noise_alive"]
        if alive and max(alive.values()) == 0.0:
            logger.warning(
                "step %d: phi's noise path is dead (relu(E1(h)) = 0 at every site): its noise no "
                "longer depends on the input and its noise weights get no gradient. Consider "
                "--placement before_activation.",
                step,
            )
        metrics.write(self.last_record)
        return self.last_record

    def _checkpoint(self, step: int) -> None:
        cuda = self.comm.device.type == "cuda"
        local = {
            "tasks": {
                learner.task.index: checkpoint.to_cpu(learner.state_dict())
                for learner in self.learners
            },
            "rng": {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.comm.device) if cuda else None,
            },
        }
        gathered = self.comm.gather(local)
        # Rank 0 writes it; a failed write stops every rank, which then name the last good one.
        self.comm.on_main(lambda: self._write_checkpoint(step, gathered))
        self.checkpointed = step

    def _write_checkpoint(self, step: int, gathered: list[Any] | None) -> None:
        assert gathered is not None  # rank 0
        payload = {
            "step": step,
            "config": self.config.to_dict(),
            "split": self.split.to_dict(),
            "normalization": [self.mean, self.std],
            "phi": checkpoint.to_cpu(self.phi.state_dict()),
            "phi_optimizer": checkpoint.to_cpu(self.phi_optimizer.state_dict()),
            "tasks": {task: state for part in gathered for task, state in part["tasks"].items()},
            "rng": [part["rng"] for part in gathered],
            "metrics": self.last_record,
            "world_size": self.comm.world_size,
            "segments": self._trained_segments(step),
        }
        checkpoint.save(self.output / checkpoint.CHECKPOINT_NAME, payload)

    def _trained_segments(self, step: int) -> list[dict[str, Any]]:
        """Which steps ran where, up to ``step``: one entry per launch, with every rank's
        machine (``None``: trained before checkpoints recorded it). Rank 0 only."""
        return with_segment(self.segments, self.start, step, machines=self.machines)

    # -- the result -------------------------------------------------------------------------

    def _save_phi(self, target: Path) -> None:
        config, split, data = self.config, self.split, self.data
        final = (self.last_record or {}).get("mean", {})
        metadata = {
            "source_dataset": data.source,
            "source_architecture": config.model,
            "meta_training_steps": str(config.steps),
            "meta_training_tasks": f"{split.num_tasks} {split.mode} (groups of {split.group_size})",
            "meta_training_seed": str(config.seed),
        }
        metadata.update({f"final_{key}": f"{value:.4f}" for key, value in final.items()})
        self.phi.config = dataclasses.replace(self.phi.config, metadata=metadata)
        self.phi.save_pretrained(target, provenance=self._recipe(final))
        logger.info("phi saved to %s", target)

    def _recipe(self, final: dict[str, float]) -> str:
        config, split, data = self.config, self.split, self.data
        clip = "no clamp" if config.clip is None else f"clamp at {config.clip:g}"
        augment = f"random crop (pad {config.padding})" if config.padding else "no crop"
        augment += " + horizontal flip" if config.flip else ", no flip"
        data_line = (
            f"- Data: `{data.source}`, {data.num_classes} classes, {len(data)} images at "
            f"{config.image_size}x{config.image_size}, {augment}."
        )
        tasks_line = (
            f"- Tasks: {split.num_tasks}, {split.mode} (groups of {split.group_size} classes, "
            "each group's images halved and the halves swapped between paired tasks), split "
            f"seed {split.seed}."
        )
        optimisation_line = (
            f"- Optimisation: {config.steps} steps, batch {config.batch_size}; Adam lr "
            f"{config.lr:g}, weight decay {config.weight_decay:g} for the networks; lr "
            f"{config.phi_lr:g}, weight decay {config.phi_weight_decay:g} for phi; {clip}; "
            f"seed {config.seed}; {self.comm.world_size} process(es)."
        )
        networks_line = (
            f"- Networks: one `{config.model}` per task (sites: {config.sites}, placement: "
            f"{config.placement}), phi shared."
        )
        lines = [
            "Meta-trained with `metaperturb train` (MetaPerturb, Algorithm 1, first order).",
            "",
            data_line,
            tasks_line,
            networks_line,
            optimisation_line,
        ]
        lines.append(
            "- Trained on: "
            + "; ".join(_segment_line(part) for part in self._trained_segments(config.steps))
            + "."
        )
        if final:
            lines.append(
                "- Final metrics (mean over tasks, last log interval): "
                + ", ".join(f"{key.replace('_', ' ')} {value:.4f}" for key, value in final.items())
                + "."
            )
        return "\n".join(lines)


def _segment_line(segment: dict[str, Any]) -> str:
    """``steps 0-750: 2 processes on <machine> and 1 process on <another>``."""
    machines = segment["machines"]
    if machines is None:
        where = "not recorded"
    else:
        kinds = Counter(label(machine) for machine in machines)
        where = " and ".join(
            f"{count} process{'es' if count != 1 else ''} on {kind}"
            for kind, count in kinds.items()
        )
    return f"steps {segment['from_step']}-{segment['to_step']}: {where}"


def _preview(names: list[str], count: int = 4) -> str:
    shown = ", ".join(repr(name) for name in names[:count])
    return f"[{shown}{', ...' if len(names) > count else ''}] ({len(names)})"
