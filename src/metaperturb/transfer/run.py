"""One evaluation run: train a target network from scratch with one method, test it, write the result.

The meta-testing recipe of METHOD.md (Algorithm 2): Adam lr 1e-3, weight decay 5e-4, batch 128,
lr x0.3 at 40%, 70% and 90% of the steps, random crop (pad 4) + flip; with phi, phi is frozen
and its strength ramps from 0 to 1 over the first 40% of the steps. A run checkpoints as it goes
(``<run id>.ckpt``) and resumes from there, and writes ``<run id>.json`` when it ends.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._atomic import atomic_write
from .._machine import describe, with_segment
from .._run_lock import run_lock
from ..annealing import StrengthScheduler
from ..data import ImageData, normalize
from ..diagnostics import mean_channel_scales
from ..discovery import Placement
from ..errors import TrainingStoppedError
from ..evaluation import mc_predict, update_bn
from ..hub import load_phi
from ..train.learner import create_task_network
from ..train.sampling import TaskStream, derive_seed
from ..wrapper import get_controller, set_eval_mode, wrap
from .calibration import calibration
from .config import TransferConfig, phi_label, run_id
from .regularizers import DropBlock, ManifoldMixup
from .reuse import check_same_phi, check_same_settings, current_fingerprint, find_equivalent_result
from .targets import Target, load_target, resolve_target

__all__ = [
    "TransferConfig",
    "TransferRun",
    "find_equivalent_result",
    "phi_label",
    "run_id",
    "run_transfer",
]

_NOISE_KEY = 3
#: Steps between two reads of the training loss (each read waits for the GPU to catch up).
_SETTLE_EVERY = 50
#: Training batches over which the ``update_bn`` evaluation recomputes BatchNorm statistics.
UPDATE_BN_BATCHES = 50
_INIT_KEY = 1


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load_init(model: nn.Module, source: str) -> list[str]:
    """Load matching tensors from ``source`` into the host, before it is wrapped (a source run's
    phi state, saved beside its host's, has no match there: the new run's sites start fresh);
    returns the keys left at their initialisation."""
    if source.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(source)
    else:
        state = torch.load(source, map_location="cpu", weights_only=True)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(
            f"{source} shares no tensor (name and shape) with {type(model).__name__}: pass "
            "weights saved from the same --model (e.g. a run of it with save_weights)."
        )
    model.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))


class TransferRun:
    """One run's network, data, optimizer and checkpoint, step by step.

    :func:`run_transfer` is the way to run one; this is for scripts that need the parts (a
    benchmark that scores the trained network more ways, a test that stops it part-way).
    """

    def __init__(
        self, config: TransferConfig, output_dir: Path, stop: threading.Event | None = None
    ) -> None:
        self.config = config
        self.stop = stop
        self.evaluating = False  # past training: a stop asked now needs no new checkpoint
        self.device = _device(config.device)
        target_spec = config.target if isinstance(config.target, str) else Target(**config.target)
        self.target = resolve_target(target_spec, config.data_root)
        self.train_data, self.test_data = load_target(self.target)
        self.mean, self.std = self.train_data.channel_stats()
        self.input_size = (self.target.channels, self.target.image_size, self.target.image_size)
        self.id = run_id(config)
        self.checkpoint_path = output_dir / f"{self.id}.ckpt"
        self.result_path = output_dir / f"{self.id}.json"
        self._build()
        #: The machine this process trains and evaluates on (:mod:`metaperturb._machine`), read once.
        self.machine = describe(self.device, self.channels_last)

    def _build(self) -> None:
        config = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(config.seed, _INIT_KEY))
            model = create_task_network(
                config.model, self.train_data.num_classes, self.target.channels
            )
        self.reinitialised: list[str] = []
        if config.init is not None:
            self.reinitialised = _load_init(model, config.init)
        self.model = model.to(self.device)
        self.channels_last = (
            config.channels_last if config.channels_last is not None else self.device.type == "cpu"
        )
        self.strength: StrengthScheduler | None = None
        if config.phi is not None:
            phi = load_phi(config.phi) if config.phi != "default" else None
            wrap(
                self.model,
                phi=phi,
                input_size=self.input_size,
                placement=cast(Placement, config.placement),
                exclude=config.exclude,
            )
            self.strength = StrengthScheduler(
                self.model,
                total_steps=config.steps,
                ramp_fraction=config.ramp_fraction,
                on_closed_site=cast(Literal["warn", "exclude"], config.on_closed_site),
                exclude_from=config.exclude_closed_from,
            )
        self.dropblock = (
            DropBlock(self.model, config.dropblock_rate, config.dropblock_size, self.input_size)
            if config.dropblock_rate > 0
            else None
        )
        self.mixup = (
            ManifoldMixup(self.model, config.mixup_alpha, self.input_size)
            if config.mixup_alpha > 0
            else None
        )
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(
            parameters, lr=config.lr, weight_decay=config.weight_decay
        )
        milestones = [int(config.steps * f) for f in (0.4, 0.7, 0.9)]
        self.schedule = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones, gamma=0.3)
        images = self.train_data.images.to(self.device)
        self.stream = TaskStream(
            images,
            self.train_data.labels,
            range(len(self.train_data)),
            config.batch_size,
            (config.seed, 0, 0),
            padding=config.padding,
            flip=config.flip,
            mean=self.mean,
            std=self.std,
        )
        self.step = 0
        self.curve: list[dict[str, float]] = []
        #: phi's mean channel scale per site at the step the strength reaches 1 (the end of the
        #: ramp): a site closed then passes nothing from there on, which collapsed phi* on
        #: Omniglot-100 (docs/evaluation.md). Its s at the end of training can have recovered
        #: since.
        self.full_strength_scales: dict[str, float] | None = None
        self.train_seconds = 0.0
        self.loss_sum, self.loss_count = 0.0, 0
        #: The parts of the run trained before this process, each with the machine it ran on
        #: (:mod:`metaperturb._machine`); this process's part starts at ``_segment_from``.
        self.segments: list[dict[str, Any]] = []
        self._segment_from = 0
        # The loss of the steps since the last settle, summed where it is computed: reading it
        # every step (``.item()``, ``if isfinite``) would make the host wait for the GPU.
        self._pending_loss = torch.zeros(
            (), dtype=_accumulator_dtype(self.device), device=self.device
        )
        self._pending_from = 0

    # -- checkpoints ---------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        self._settle_losses()  # never checkpoint weights a non-finite loss has reached
        return {
            "id": self.id,
            "config": json.dumps(asdict(self.config)),
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "strength": None if self.strength is None else self.strength.state_dict(),
            "curve": json.dumps(self.curve),
            "train_seconds": self.train_seconds,
            "phi_fingerprint": self.phi_fingerprint(),
            # The training loss since the last curve point (a stop can fall between two).
            "loss_sum": self.loss_sum,
            "loss_count": self.loss_count,
            "full_strength_scales": json.dumps(self.full_strength_scales),
            "segments": json.dumps(self.trained_segments()),
        }

    def trained_segments(self) -> list[dict[str, Any]]:
        """Which steps ran where: one entry per process that trained part of the run, with
        its machine (``None``: trained before checkpoints recorded it)."""
        return with_segment(self.segments, self._segment_from, self.step, machine=self.machine)

    def save_checkpoint(self) -> None:
        """Write the run's state (atomically) so that :meth:`maybe_resume` continues it."""
        import io

        buffer = io.BytesIO()
        torch.save(self._state(), buffer)
        atomic_write(self.checkpoint_path, buffer.getvalue())

    def maybe_resume(self) -> bool:
        """Load this run's checkpoint if there is one; returns whether it did."""
        if not self.checkpoint_path.is_file():
            return False
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        if state.get("id") != self.id:
            raise ValueError(
                f"{self.checkpoint_path} belongs to run {state.get('id')!r}, not {self.id!r}: "
                "delete it or use another output folder."
            )
        check_same_settings(
            json.loads(state.get("config", "{}")),
            self.config,
            self.checkpoint_path,
            training_only=True,
        )
        check_same_phi(state.get("phi_fingerprint"), self.phi_fingerprint(), self.checkpoint_path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.strength is not None:
            self.strength.load_state_dict(state["strength"])
        self.step = self._pending_from = int(state["step"])
        self.curve = json.loads(state["curve"])
        self.train_seconds = float(state["train_seconds"])
        self.loss_sum = float(state.get("loss_sum", 0.0))  # absent from older checkpoints
        self.loss_count = int(state.get("loss_count", 0))
        # Absent from older checkpoints: a run resumed past the ramp then records none.
        self.full_strength_scales = json.loads(state.get("full_strength_scales", "null"))
        segments = json.loads(state.get("segments", "null"))  # absent from older checkpoints
        self.segments = (
            segments
            if segments is not None
            else [{"from_step": 0, "to_step": self.step, "machine": None}]
        )
        self._segment_from = self.step
        return True

    # -- training ------------------------------------------------------------------------------
    def _layout(self, images: Tensor) -> Tensor:
        return (
            images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
        )

    def train(self, progress: bool, until: int | None = None) -> None:
        """Train from the current step to ``config.steps`` (or to step ``until``, before it: a
        part of the run, as a replay needs), checkpointing and recording the curve as
        configured; a stop asked ends it with a checkpoint."""
        from tqdm.auto import tqdm

        config = self.config
        last = config.steps if until is None else min(until, config.steps)
        self.model.train()
        bar = tqdm(total=last, initial=self.step, unit="step", disable=not progress, leave=False)
        started = time.perf_counter()
        while self.step < last:
            torch.manual_seed(derive_seed(config.seed, _NOISE_KEY, self.step))
            images, labels = self.stream.batch(self.step)
            images, labels = self._layout(images), labels.to(self.device)
            if self.mixup is not None:
                loss = self.mixup.loss(images, labels)
            else:
                loss = F.cross_entropy(self.model(images), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.schedule.step()
            if self.strength is not None:
                self.strength.step()
            self._pending_loss += loss.detach()
            self.step += 1
            if self.step == self.full_strength_step:
                self.full_strength_scales = self.scales()
            bar.update(1)
            if self.step % _SETTLE_EVERY == 0:
                self._settle_losses()
            if config.curve_every and self.step % config.curve_every == 0:
                self.train_seconds += time.perf_counter() - started
                self._curve_point()
                started = time.perf_counter()
            scheduled = bool(config.checkpoint_every) and self.step % config.checkpoint_every == 0
            if scheduled:
                self.train_seconds += time.perf_counter() - started
                if self.step < config.steps:
                    self.save_checkpoint()
                started = time.perf_counter()
            if self._stop_asked() and self.step < config.steps:
                self.train_seconds += time.perf_counter() - started
                if not scheduled:  # else this step's checkpoint was just written
                    self.save_checkpoint()
                bar.close()
                raise TrainingStoppedError(
                    f"run {self.id} stopped at step {self.step} of {config.steps} as asked; "
                    f"{self.checkpoint_path.name} holds that step: run the same command to go on.",
                    asked=True,
                )
        self._settle_losses()
        self.train_seconds += time.perf_counter() - started
        bar.close()

    @property
    def full_strength_step(self) -> int | None:
        """The step after which phi's strength is 1 (``None`` without phi)."""
        return None if self.strength is None else self.strength.full_strength_step

    def _settle_losses(self) -> None:
        """Add the pending steps' loss to the running mean, or raise if one was not finite.

        One host-device sync per call; the weights past a non-finite step are never saved, so
        the last checkpoint stays a good place to resume from."""
        steps = self.step - self._pending_from
        if steps == 0:
            return
        total = float(self._pending_loss)
        if not math.isfinite(total):
            raise FloatingPointError(
                f"run {self.id}: the training loss was {total} in steps {self._pending_from + 1}"
                f"-{self.step}; lower the learning rate or check the data."
            )
        self.loss_sum += total
        self.loss_count += steps
        self._pending_loss.zero_()
        self._pending_from = self.step

    def _stop_asked(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def training_inputs(self, count: int, first_step: int) -> Iterator[Tensor]:
        """``count`` augmented training batches as training would see them at ``first_step`` and
        after (inputs only, in the run's layout)."""
        return (self._layout(self.stream.batch(first_step + i)[0]) for i in range(count))

    def _curve_point(self) -> None:
        self._settle_losses()
        count = min(self.config.curve_images, len(self.test_data))
        rows = torch.linspace(0, len(self.test_data) - 1, count).long()
        probabilities = self.predict(rows)
        accuracy = float((probabilities.argmax(1) == self.test_data.labels[rows]).float().mean())
        train_loss = self.loss_sum / max(1, self.loss_count)
        self.curve.append({"step": self.step, "test_accuracy": accuracy, "train_loss": train_loss})
        self.loss_sum, self.loss_count = 0.0, 0
        self.model.train()

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, rows: Tensor | None = None, samples: int | None = None) -> Tensor:
        """Class probabilities of test ``rows`` (all by default) in eval mode."""
        data: ImageData = self.test_data
        rows = torch.arange(len(data)) if rows is None else rows
        self.model.eval()
        outputs = []
        for chunk in rows.split(500):
            if self.evaluating and self._stop_asked():
                raise TrainingStoppedError(
                    f"run {self.id} stopped during its evaluation as asked; "
                    f"{self.checkpoint_path.name} holds the trained network: run the same "
                    "command to evaluate it.",
                    asked=True,
                )
            batch = self._layout(normalize(data.images[chunk].to(self.device), self.mean, self.std))
            if samples is not None:
                outputs.append(mc_predict(self.model, batch, samples).cpu())
            else:
                outputs.append(self.model(batch).float().softmax(dim=1).cpu())
        return torch.cat(outputs)

    def _scores(self, probabilities: Tensor, seconds: float) -> dict[str, Any]:
        labels = self.test_data.labels
        # A diverged network can overflow to inf/NaN on some inputs: those count as wrong,
        # NLL and ECE cover the rest, and how many there were is part of the result.
        finite = torch.isfinite(probabilities).all(dim=1)
        correct = (probabilities.argmax(1) == labels) & finite
        kept, kept_labels = probabilities[finite], labels[finite]
        nll = F.nll_loss(kept.clamp_min(1e-12).log(), kept_labels).item() if len(kept) else math.nan
        report = calibration(kept, kept_labels)
        return {
            "accuracy": float(correct.float().mean()),
            "nll": nll,
            "ece": report["ece"],
            "reliability": report["bins"],
            "nonfinite_predictions": int((~finite).sum()),
            "seconds": seconds,
        }

    def evaluate(self) -> dict[str, Any]:
        """Score the trained network on the test split in every configured eval mode."""

        def timed(**kwargs: Any) -> dict[str, Any]:
            torch.manual_seed(derive_seed(self.config.seed, _NOISE_KEY, -1))
            started = time.perf_counter()
            probabilities = self.predict(**kwargs)
            return self._scores(probabilities, time.perf_counter() - started)

        self.evaluating = True
        results = {"default": timed()}
        if self.config.phi is not None:
            controller = get_controller(self.model)
            results["default"]["mode"] = controller.eval_mode
            if self.config.eval_modes:
                for mode in ("sample", "off"):
                    set_eval_mode(self.model, mode)
                    results[mode] = timed()
                set_eval_mode(self.model, "expectation")
            for samples in self.config.mc_samples:
                results[f"mc{samples}"] = timed(samples=samples)
        # Last, and undone after: the default eval once more, with BatchNorm statistics recomputed
        # in eval mode (metaperturb.update_bn). For Base it is the control: how much of a change
        # comes from statistics that lag behind the weights rather than from phi's noise.
        trained = {k: v.clone() for k, v in self.model.state_dict().items()}
        started = time.perf_counter()
        try:
            update_bn(self.training_inputs(UPDATE_BN_BATCHES, self.config.steps), self.model)
        except FloatingPointError as error:  # statistics that overflowed: recorded, no score
            results["update_bn"] = {"failed": str(error), "batches": UPDATE_BN_BATCHES}
            return results
        seconds = time.perf_counter() - started
        results["update_bn"] = timed()
        results["update_bn"].update(batches=UPDATE_BN_BATCHES, update_seconds=seconds)
        self.model.load_state_dict(trained)
        return results

    def phi_fingerprint(self) -> str | None:
        """SHA-256 of phi's numbers (``None`` without phi): names the phi a result used."""
        return None if self.config.phi is None else get_controller(self.model).phi.fingerprint()

    def eval_clip(self) -> float | None:
        """The clamp phi's sites applied at test time (``None``: none, or no phi)."""
        if self.config.phi is None:
            return None
        return get_controller(self.model).phi.config.active_clip(training=False)

    def scales(self) -> dict[str, float] | None:
        """Mean channel scale s of phi per site (running statistics): the paper's Figure 7."""
        if self.config.phi is None:
            return None
        return mean_channel_scales(self.model)


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it, as the host's Python float sum was (MPS has none)."""
    return torch.float32 if device.type == "mps" else torch.float64


def run_transfer(
    config: TransferConfig,
    output_dir: str | Path,
    *,
    progress: bool = True,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Train, test and record one run; returns the result (also in ``<output_dir>/<id>.json``).

    A finished run (its JSON exists) is not repeated: its result is read back, also when it was
    made under another phi name with the same phi numbers (:func:`find_equivalent_result`). A
    run stopped part-way resumes from its checkpoint. While it runs, ``<id>.lock`` marks it
    taken: another process asked for the same run gets :class:`~metaperturb.errors.
    RunInProgressError` (a sweep skips it), so several sweeps can share one results folder.

    ``stop`` (e.g. from :func:`~metaperturb.stopping.stop_on_signals`), once set, ends
    the run at the next step with a checkpoint of that step, or between evaluation batches, and
    raises :class:`~metaperturb.errors.TrainingStoppedError`.
    """
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    result_path = output / f"{run_id(config)}.json"
    if result_path.is_file():
        try:
            result: dict[str, Any] = json.loads(result_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{result_path} is not a readable run result ({error}); results are written "
                "whole, so another program changed it: delete it to run again."
            ) from error
        check_same_settings(result.get("config", {}), config, result_path)
        check_same_phi(result.get("phi_fingerprint"), current_fingerprint(config), result_path)
        return result
    same = find_equivalent_result(config, output)
    if same is not None:
        return cast(dict[str, Any], json.loads(same.read_text()))
    with run_lock(output / f"{run_id(config)}.lock"):
        if result_path.is_file():  # finished by another process while this one looked
            return cast(dict[str, Any], json.loads(result_path.read_text()))
        return _train_and_record(config, output, result_path, progress, stop)


def _train_and_record(
    config: TransferConfig,
    output: Path,
    result_path: Path,
    progress: bool,
    stop: threading.Event | None,
) -> dict[str, Any]:
    run = TransferRun(config, output, stop)
    resumed = run.maybe_resume()
    run.train(progress)
    # The evaluation can take as long as training (MC-100 of 10,000 images on a CPU): a run
    # stopped there resumes from the trained network, not from the last periodic checkpoint.
    run.save_checkpoint()
    evaluation = run.evaluate()
    result = {
        "id": run.id,
        "target": config.target,
        "model": config.model,
        "method": config.method,
        "seed": config.seed,
        "steps": config.steps,
        "accuracy": evaluation["default"]["accuracy"],
        "ece": evaluation["default"]["ece"],
        "evaluation": evaluation,
        "curve": run.curve,
        "scales": run.scales(),
        "scales_at_full_strength": run.full_strength_scales,
        # on_closed_site="exclude": each site switched off for closing, with the step.
        "excluded_sites": None if run.strength is None else run.strength.excluded,
        # Each site found closed, with the step, under either setting ({}: the setting changed
        # nothing, so this result answers the other one too: reuse.find_equivalent_result).
        # None: not known (no phi, or resumed from a checkpoint older than the record).
        "closed_sites": (
            run.strength.closed
            if run.strength is not None and run.strength.closed_complete
            else None
        ),
        # Each of those sites with the last step it was found closed: a run that switched nothing
        # off answers a rule that waits for a strength above theirs (reuse.trains_as).
        "closed_sites_last": None if run.strength is None else run.strength.last_closed,
        "full_strength_step": run.full_strength_step,
        "train_seconds": run.train_seconds,
        "resumed": resumed,
        "train_images": len(run.train_data),
        "test_images": len(run.test_data),
        "classes": run.train_data.num_classes,
        "reinitialised_keys": run.reinitialised,
        "phi_fingerprint": run.phi_fingerprint(),
        # Results written before this key existed were evaluated without a clamp.
        "eval_clip": run.eval_clip(),
        "config": asdict(config),
        # The machine of this process (which evaluated the run), and where each part of the
        # training ran: a run resumed elsewhere took another floating-point path (.machine).
        "machine": run.machine,
        "segments": run.trained_segments(),
    }
    # Non-finite predictions count as wrong (and are counted); all of them means no result.
    if evaluation["default"]["nonfinite_predictions"] == len(run.test_data.labels):
        raise FloatingPointError(
            f"run {run.id}: every test prediction of the default evaluation is NaN or infinite, "
            "so the trained network has no accuracy to record and no result was written. Lower "
            "the learning rate or check the data, then rerun in a new output folder (this one's "
            "checkpoint holds the diverged network)."
        )
    if config.save_weights:
        from safetensors.torch import save as safetensors_bytes

        # The whole state: the host's tensors and phi's site statistics and switches, which
        # the trained network needs to be scored again.
        state = {k: v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()}
        atomic_write(output / f"{run.id}.safetensors", safetensors_bytes(state))
    atomic_write(result_path, json.dumps(result, indent=1) + "\n")
    run.checkpoint_path.unlink(missing_ok=True)
    return result
