"""Meta-training in one process: the step, the run folder, checkpoints and bit-exact resume."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import metaperturb
from metaperturb._machine import cpu_model
from metaperturb.errors import TrainingStoppedError
from metaperturb.train import CheckpointError, RunExistsError, TrainConfig, read_metrics, train
from metaperturb.train.learner import TaskLearner, batchnorm_eval
from metaperturb.train.sampling import EpochSampler, TaskStream, derive_seed
from metaperturb.wrapper import get_controller

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = DATA / "tiny-imagenet-200-32px"
needs_tiny = pytest.mark.skipif(not TINY.is_dir(), reason=f"{TINY} not present")


def _config(output: Path, **changes: object) -> TrainConfig:
    """2 tasks on 4 Tiny ImageNet classes x 20 images at 16 px, batch 8: about a second a run."""
    settings: dict[str, object] = {
        "data": str(TINY),
        "classes": 4,
        "max_per_class": 20,
        "image_size": 16,
        "num_tasks": 2,
        "batch_size": 8,
        "steps": 4,
        "log_every": 2,
        "checkpoint_every": 2,
        "progress": False,
        "threads": 1,
        "device": "cpu",
        "output_dir": str(output),
    }
    return TrainConfig(**(settings | changes))  # type: ignore[arg-type]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not TINY.is_dir():
        pytest.skip(f"{TINY} not present")
    output = tmp_path_factory.mktemp("run")
    train(_config(output))
    return output


@needs_tiny
def test_run_folder_and_loadable_phi(finished_run: Path) -> None:
    names = {path.name for path in finished_run.iterdir()}
    assert {"train_config.json", "split.json", "metrics.jsonl", "checkpoint.pt", "phi"} <= names
    phi = metaperturb.Perturbation.from_pretrained(finished_run / "phi")
    state = _load(finished_run / "checkpoint.pt")
    for name, tensor in phi.state_dict().items():
        assert torch.equal(tensor, state["phi"][name])
    # phi learned: it is no longer its initialisation (N(0, 0.01) weights moved by Adam).
    from metaperturb.train.loop import _PHI_KEY

    torch.manual_seed(derive_seed(0, _PHI_KEY))
    initial = metaperturb.Perturbation()
    assert not torch.equal(initial.scale_weight, phi.scale_weight)
    assert phi.config.metadata["source_dataset"] == "tiny-imagenet-200-32px/train"
    assert phi.config.metadata["meta_training_steps"] == "4"
    card = (finished_run / "phi" / "README.md").read_text()
    assert "2, classwise" in card and "batch 8" in card and "heldout acc" in card
    model = metaperturb.wrap(
        metaperturb.models.cifar_resnet20(num_classes=3), phi=finished_run / "phi"
    )
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)


@needs_tiny
def test_metrics_log(finished_run: Path) -> None:
    records = read_metrics(finished_run / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4]
    assert set(records[-1]["tasks"]) == {"0", "1"}
    for record in records:
        for metrics in [record["mean"], *record["tasks"].values()]:
            assert set(metrics) == {"train_loss", "train_acc", "heldout_loss", "heldout_acc"}
            assert 0.0 <= metrics["heldout_acc"] <= 1.0 and metrics["train_loss"] > 0
        assert len(record["scale"]) == 9 and all(0 < s < 1 for s in record["scale"].values())
        # A fresh phi's noise path passes part of its input (untrained kernels of both signs).
        alive = record["noise_alive"]
        assert set(alive) == set(record["scale"]) and 0 < max(alive.values()) <= 1
    # phi's weight magnitudes, as the run ended: the log's last line matches the saved phi.
    phi = metaperturb.Perturbation.from_pretrained(finished_run / "phi")
    expected = {name: p.abs().mean().item() for name, p in phi.named_parameters()}
    assert records[-1]["phi"] == pytest.approx(expected)


@needs_tiny
def test_checkpoint_contents(finished_run: Path) -> None:
    state = _load(finished_run / "checkpoint.pt")
    assert state["step"] == 4 and state["world_size"] == 1
    # The default layout is recorded as decided (channels_last on a CPU).
    assert TrainConfig.from_dict(state["config"]) == _config(finished_run, channels_last=True)
    split = json.loads((finished_run / "split.json").read_text())
    assert state["split"] == split
    assert sorted(state["tasks"]) == [0, 1]
    for task in state["tasks"].values():
        keys = set(task["model"])
        assert "metaperturb.sites.0.running_mean" in keys and "stem.1.running_var" in keys
        assert not any(key.startswith("metaperturb.phi.") for key in keys)
        assert all(int(s["step"]) == 4 for s in task["optimizer"]["state"].values())
    assert int(state["phi_optimizer"]["state"][0]["step"]) == 4
    assert set(state["phi"]) == set(metaperturb.Perturbation().state_dict())
    assert state["rng"][0]["cpu"].dtype == torch.uint8
    assert state["metrics"]["step"] == 4


@needs_tiny
def test_resume_gives_the_same_phi_bit_for_bit(tmp_path: Path, finished_run: Path) -> None:
    first = _config(tmp_path / "resumed", steps=2)
    train(first)
    assert _load(tmp_path / "resumed" / "checkpoint.pt")["step"] == 2
    train(dataclasses.replace(first, steps=4, resume=True, log_every=1))
    resumed = _load(tmp_path / "resumed" / "checkpoint.pt")
    straight = _load(finished_run / "checkpoint.pt")
    assert resumed["step"] == 4
    for name, tensor in straight["phi"].items():
        assert torch.equal(resumed["phi"][name], tensor), name
    for task in (0, 1):
        for name, tensor in straight["tasks"][task]["model"].items():
            assert torch.equal(resumed["tasks"][task]["model"][name], tensor), name
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")]
    assert steps == [2, 3, 4]


@needs_tiny
def test_a_run_records_which_steps_trained_on_which_machine(
    tmp_path: Path, finished_run: Path
) -> None:
    """Each launch is a segment with every rank's machine, in the checkpoint and phi's card; a
    checkpoint from before the record leaves its part "not recorded"."""
    this = cpu_model()
    straight = _load(finished_run / "checkpoint.pt")["segments"]
    assert [(s["from_step"], s["to_step"]) for s in straight] == [(0, 4)]
    assert [m["cpu"] for m in straight[0]["machines"]] == [this]
    assert straight[0]["machines"][0]["threads"] == 1

    first = _config(tmp_path / "run", steps=2)
    train(first)
    old = _load(tmp_path / "run" / "checkpoint.pt")
    del old["segments"]  # as checkpoints written before 2026-12-07 are
    torch.save(old, tmp_path / "run" / "checkpoint.pt")
    train(dataclasses.replace(first, steps=4, resume=True))
    segments = _load(tmp_path / "run" / "checkpoint.pt")["segments"]
    assert [(s["from_step"], s["to_step"]) for s in segments] == [(0, 2), (2, 4)]
    assert segments[0]["machines"] is None
    assert segments[1]["machines"] == straight[0]["machines"]
    card = (tmp_path / "run" / "phi" / "README.md").read_text()
    assert "Trained on: steps 0-2: not recorded; steps 2-4: 1 process on " in card
    assert this in card


@needs_tiny
def test_flush_denormal_is_a_machine_setting_recorded_per_segment(tmp_path: Path) -> None:
    """``--flush-denormal`` must act before torch's threads start, so each launch is a fresh
    interpreter; a resume may turn it off (like ``--threads``), and the segments say which
    steps ran with it."""
    argv = ["train", "--data", str(TINY), "--classes", "4", "--max-per-class", "10"]
    argv += ["--image-size", "8", "--num-tasks", "2", "--batch-size", "4", "--no-progress"]
    argv += ["--threads", "2", "--device", "cpu", "--output-dir", str(tmp_path / "run")]
    for extra in (["--steps", "1", "--flush-denormal"], ["--steps", "2", "--resume"]):
        done = subprocess.run(
            [sys.executable, "-m", "metaperturb", *argv, *extra],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    segments = _load(tmp_path / "run" / "checkpoint.pt")["segments"]
    assert [(s["from_step"], s["to_step"]) for s in segments] == [(0, 1), (1, 2)]
    assert [s["machines"][0]["flush_denormal"] for s in segments] == [True, False]
    assert [s["machines"][0]["threads"] for s in segments] == [2, 2]
    card = (tmp_path / "run" / "phi" / "README.md").read_text()
    assert card.count("denormals flushed to zero") == 1


@needs_tiny
def test_a_run_asked_to_stop_checkpoints_the_step_it_is_at(
    tmp_path: Path, finished_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train(config, stop=event)`` set during step 3 (between checkpoints at 2 and 4, and
    between log records at 2 and 4): the run checkpoints step 3 and raises; resuming gives the
    uninterrupted phi and metrics, the record of step 4 included (it averages steps 3 and 4,
    so the metric sums since step 2 are part of the checkpoint)."""
    stop = threading.Event()
    real = TaskLearner.step

    def step(self: TaskLearner, index: int, grads: list[torch.Tensor]) -> torch.Tensor:
        losses = real(self, index, grads)
        if index == 2:  # the third step
            stop.set()
        return losses

    monkeypatch.setattr(TaskLearner, "step", step)
    config = _config(tmp_path / "stopped")
    with pytest.raises(TrainingStoppedError, match="stopped at step 3 of 4 as asked") as stopped:
        train(config, stop=stop)
    assert stopped.value.asked  # a stop asked, not a failure: the CLI exits 143
    assert _load(tmp_path / "stopped" / "checkpoint.pt")["step"] == 3
    monkeypatch.setattr(TaskLearner, "step", real)
    train(dataclasses.replace(config, resume=True))
    resumed = _load(tmp_path / "stopped" / "checkpoint.pt")
    straight = _load(finished_run / "checkpoint.pt")
    for name, tensor in straight["phi"].items():
        assert torch.equal(resumed["phi"][name], tensor), name
    records = read_metrics(tmp_path / "stopped" / "metrics.jsonl")
    expected = read_metrics(finished_run / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4]
    for got, want in zip(records, expected, strict=True):
        assert got["mean"] == want["mean"] and got["tasks"] == want["tasks"]


@needs_tiny
@pytest.mark.parametrize("broken", ["loss", "gradient"])
def test_a_diverged_step_stops_the_run_before_phi_or_a_checkpoint_takes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: str
) -> None:
    """A non-finite loss or phi gradient at step 3 (after the checkpoint of step 2): the run
    stops there, phi is not stepped, the step-2 checkpoint is not overwritten and no phi/ is
    published, and the error says what to change."""
    real = TaskLearner.step

    def step(self: TaskLearner, index: int, grads: list[torch.Tensor]) -> torch.Tensor:
        losses = real(self, index, grads)
        if index == 2 and self.task.index == 1:
            if broken == "loss":
                return losses * float("nan")
            grads[0].fill_(float("inf"))
        return losses

    monkeypatch.setattr(TaskLearner, "step", step)
    output = tmp_path / "diverged"
    config = _config(output)
    with pytest.raises(TrainingStoppedError, match="diverged at step 3 of 4") as stopped:
        train(config)
    message = str(stopped.value)
    assert not stopped.value.asked
    assert ("2 of the tasks' train and held-out losses" in message) == (broken == "loss")
    assert ("phi's gradient was not finite" in message) == (broken == "gradient")
    assert "checkpoint of step 2" in message and "--phi-lr" in message
    saved = _load(output / "checkpoint.pt")
    assert saved["step"] == 2
    assert all(torch.isfinite(t).all() for t in saved["phi"].values())
    assert not (output / "phi").exists()


@needs_tiny
def test_refuses_to_overwrite_or_change_a_run(tmp_path: Path, finished_run: Path) -> None:
    with pytest.raises(RunExistsError, match="--resume"):
        train(_config(finished_run))
    with pytest.raises(CheckpointError, match="batch_size: run has 8, asked 16"):
        train(_config(finished_run, batch_size=16, resume=True))
    with pytest.raises(CheckpointError, match="only continue forward"):
        train(_config(finished_run, steps=2, resume=True))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(_config(tmp_path / "empty", resume=True))


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="num_tasks must be even"):
        TrainConfig(data="x", num_tasks=3)
    with pytest.raises(ValueError, match="task_mode must be one of"):
        TrainConfig(data="x", task_mode="other")
    with pytest.raises(ValueError, match="data is required"):
        TrainConfig()
    assert TrainConfig(data="x", clip=0).clip is None


def test_epoch_sampler_covers_every_row_once_per_epoch() -> None:
    sampler = EpochSampler(size=10, batch_size=4, seed=3)
    first_epochs = torch.cat([sampler.positions(step) for step in range(5)])  # 20 = 2 epochs
    assert sorted(first_epochs[:10].tolist()) == list(range(10))
    assert sorted(first_epochs[10:].tolist()) == list(range(10))
    assert torch.equal(EpochSampler(10, 4, 3).positions(3), sampler.positions(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_and_the_meter_queue_their_work_without_waiting_for_the_gpu() -> None:
    """A tensor made from host data (``.to("cuda")``, ``new_tensor``) waits for every queued
    kernel, which keeps the host from queueing the next step's work: the batch path and the
    metric sums must not do that."""
    from metaperturb.train.metrics import Meter

    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(64) % 4
    streams = [
        TaskStream(
            data, labels, range(64), 16, (0, 1, 2), padding=2, flip=True, mean=[0.5] * 3,
            std=[0.25] * 3,
        )
        for data in (images.cuda(), images)
    ]  # fmt: skip
    meter = Meter(torch.device("cuda"))
    streams[0].batch(0)  # warm-up: the first pinned buffer
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch, targets = streams[0].batch(1)
        logits = torch.zeros(16, 4, device="cuda")
        meter.add("train", logits.sum(), logits, targets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected_batch, expected_targets = streams[1].batch(1)  # the same as on the CPU
    torch.testing.assert_close(batch.cpu(), expected_batch)
    assert torch.equal(targets.cpu(), expected_targets)
    assert meter.collect()["train_acc"] == (expected_targets == 0).float().mean().item()


def _learner(seed: int = 0, placement: str = "output", channels_last: bool = False) -> TaskLearner:
    from metaperturb.tasks import make_split

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8, generator=generator)
    labels = torch.arange(24) % 3
    task = make_split(labels.tolist(), num_tasks=2, seed=0).tasks[0]
    local = torch.tensor(task.local_label_map(3))[labels]
    streams = [
        TaskStream(
            images,
            local,
            rows,
            6,
            (seed, 0, half),
            padding=2,
            flip=True,
            mean=[0.5] * 3,
            std=[0.25] * 3,
        )
        for half, rows in enumerate((task.train, task.heldout))
    ]
    phi = metaperturb.Perturbation()
    return TaskLearner(
        task,
        phi,
        streams[0],
        streams[1],
        model_name="cifar_resnet20",
        input_size=(3, 16, 16),
        lr=1e-3,
        weight_decay=5e-4,
        seed=seed,
        sites="block",
        device=torch.device("cpu"),
        placement=placement,
        channels_last=channels_last,
    )


def test_step_updates_theta_on_train_and_only_accumulates_phi_on_heldout() -> None:
    torch.set_num_threads(1)
    learner = _learner()
    model = learner.model
    phi_before = copy.deepcopy(learner.phi.state_dict())
    reference = copy.deepcopy(model)  # the train pass alone, same batch and noise
    theta_before = [p.detach().clone() for p in learner.theta]
    grads = [torch.zeros_like(p) for p in learner.phi.parameters()]
    learner.step(0, grads)

    assert all(torch.equal(v, learner.phi.state_dict()[k]) for k, v in phi_before.items())
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(p.requires_grad for p in learner.phi.parameters()) and not learner.phi.frozen
    assert any(not torch.equal(a, b) for a, b in zip(theta_before, learner.theta, strict=True))
    # BatchNorm statistics moved on the train batch only; phi's site statistics on both.
    torch.manual_seed(derive_seed(0, 2, 0, 0))
    reference.train()
    reference(learner.train_stream.batch(0)[0])
    bn = dict(model.named_buffers())
    bn_ref = dict(reference.named_buffers())
    assert torch.equal(bn["stem.1.running_mean"], bn_ref["stem.1.running_mean"])
    site = "metaperturb.sites.0.running_mean"
    assert not torch.equal(bn[site], bn_ref[site])


def test_phi_gets_no_gradient_from_the_train_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The held-out loss made 0 (its gradient too): phi's summed gradient must then be exactly
    0, so nothing of the train loss's gradient leaked into it."""
    import torch.nn.functional as F

    torch.set_num_threads(1)
    learner = _learner()
    real = F.cross_entropy
    calls: list[int] = []

    def cross_entropy(*args: object, **kwargs: object) -> torch.Tensor:
        loss = real(*args, **kwargs)  # type: ignore[arg-type]
        calls.append(1)
        return loss * 0 if len(calls) == 2 else loss  # the second call is the held-out loss

    monkeypatch.setattr(F, "cross_entropy", cross_entropy)
    grads = [torch.zeros_like(p) for p in learner.phi.parameters()]
    losses = learner.step(0, grads)
    assert len(calls) == 2 and losses[0] > 0  # the train loss itself was real
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_batchnorm_eval_restores_modes() -> None:
    model = metaperturb.models.cifar_resnet20(num_classes=2)
    model.train()
    with batchnorm_eval(model):
        assert not model.stem[1].training and model.training
    assert model.stem[1].training
    controller_model = metaperturb.wrap(model, phi=metaperturb.Perturbation(), trainable=True)
    with batchnorm_eval(controller_model):
        assert get_controller(controller_model).training


def test_every_setting_is_a_documented_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from metaperturb.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for spec in dataclasses.fields(TrainConfig):
        assert "--" + spec.name.replace("_", "-") in text, spec.name
    assert "(default: 750)" in text and "--no-flip" in text and "torchrun" in text


@needs_tiny
def test_command_line_train_and_plot(
    tmp_path: Path, finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from metaperturb.cli import main

    output = tmp_path / "cli-run"
    argv = ["train", "--data", str(TINY), "--classes", "4", "--max-per-class", "10"]
    argv += ["--image-size", "8", "--num-tasks", "2", "--batch-size", "4", "--steps", "1"]
    argv += ["--no-progress", "--threads", "1", "--device", "cpu", "--output-dir", str(output)]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(output / "phi")
    assert (output / "phi" / "model.safetensors").is_file()
    assert main(argv) == 1  # the run exists: a one-line error, no traceback
    assert "--resume" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "other"), "--num-tasks", "3"]) == 2
    assert "num_tasks must be even" in capsys.readouterr().err

    assert main(["plot", str(finished_run), "-o", str(tmp_path / "m.png")]) == 0
    png = (tmp_path / "m.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_plot_without_a_log_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from metaperturb.cli import main

    assert main(["plot", str(tmp_path)]) == 1
    assert "no metrics log" in capsys.readouterr().err


@needs_tiny
def test_select_scores_candidates_and_keeps_the_best(
    tmp_path: Path, finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from metaperturb.cli import main

    # A candidate meta-trained before the blocks' last ReLU is meta-tested there.
    before = metaperturb.PerturbationConfig(placement="before_activation")
    untrained = metaperturb.Perturbation(before).save_pretrained(tmp_path / "untrained")
    candidates = [str(finished_run), str(finished_run / "phi"), str(untrained)]
    argv = ["select", *candidates, "--data", str(TINY), "--split", "validation"]
    argv += ["--classes", "3", "--max-per-class", "8", "--image-size", "16", "--steps", "3"]
    argv += ["--batch-size", "6", "--threads", "1", "--no-progress", "--device", "cpu"]
    (tmp_path / "selected" / "best").mkdir(parents=True)
    (tmp_path / "selected" / "best" / "left-by-an-earlier-winner.png").write_bytes(b"old")
    assert main([*argv, "--output-dir", str(tmp_path / "selected")]) == 0
    report = json.loads((tmp_path / "selected" / "selection.json").read_text())
    scores = report["scores"]
    assert set(scores) == set(candidates) and report["baseline"] is None
    # The same phi under two names: the same network, batches and noise, the same score.
    assert scores[candidates[0]] == scores[candidates[1]]
    assert report["best"] == max(scores, key=scores.__getitem__)
    # The first 4 of each class's 8 images train, the other 4 test.
    assert report["validation"]["target"]["test_skip_per_class"] == 4
    assert (report["validation"]["train"], report["validation"]["test"]) == (12, 12)
    # Each meta-test is a result of the evaluation harness, so a rerun reads them back.
    meta_tests = sorted(p.name for p in (tmp_path / "selected" / "meta-tests").glob("*.json"))
    assert len(meta_tests) == 2 and sum(",pre-act]" in name for name in meta_tests) == 1
    best = metaperturb.Perturbation.from_pretrained(tmp_path / "selected" / "best")
    assert best.scale_weight.shape == (1, 10)
    # best/ is the winner's own folder (its card keeps its provenance), and only that.
    winner = Path(report["best"])
    winner = winner / "phi" if (winner / "phi").is_dir() else winner
    copied = {p.name: p.read_bytes() for p in (tmp_path / "selected" / "best").iterdir()}
    assert copied == {p.name: p.read_bytes() for p in winner.iterdir() if p.is_file()}
    assert f"best: {report['best']}" in capsys.readouterr().out


def _phi_with_scale(tmp_path: Path, name: str, channel_weight: float) -> str:
    """A phi whose channel scale is sigmoid(channel_weight * C / widest) at every site: 0.5
    with 0, about 0 (a closed site everywhere) with -50."""
    phi = metaperturb.Perturbation()
    with torch.no_grad():
        phi.scale_weight.zero_()
        phi.scale_weight[0, 8] = channel_weight  # the channel-ratio feature
    phi.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


@needs_tiny
def test_select_averages_extra_tasks_and_passes_over_a_phi_that_closes_sites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from metaperturb.cli import main

    open_, closed = _phi_with_scale(tmp_path, "open", 0.0), _phi_with_scale(tmp_path, "shut", -50)
    argv = ["select", open_, closed, "--data", str(TINY), "--split", "validation"]
    argv += ["--classes", "3", "--max-per-class", "8", "--image-size", "16", "--steps", "5"]
    argv += ["--batch-size", "6", "--threads", "1", "--no-progress", "--device", "cpu"]
    argv += ["--extra-task", "classes=4", "skip-per-class=8", "model=conv4"]
    assert main([*argv, "--output-dir", str(tmp_path / "s")]) == 0
    report = json.loads((tmp_path / "s" / "selection.json").read_text())
    first, extra = report["tasks"]
    assert (first["data"], extra["data"]) == (f"{TINY.name}/validation",) * 2
    # The extra task's meta-tests train its own network.
    assert (first["model"], extra["model"]) == ("cifar_resnet20", "conv4")
    assert extra["label"] == f"1: {TINY.name}/validation, conv4"
    meta_tests = [p.name for p in (tmp_path / "s" / "meta-tests").glob("*.json")]
    assert sum("__conv4__" in name for name in meta_tests) == 2, meta_tests
    assert (extra["target"]["classes"], extra["target"]["skip_per_class"]) == (4, 8)
    assert (extra["train"], extra["test"]) == (16, 16) and (first["train"], first["test"]) == (
        12,
        12,
    )
    for name in (open_, closed):  # the score is the mean over the tasks
        mean = (first["scores"][name] + extra["scores"][name]) / 2
        assert report["scores"][name] == pytest.approx(mean)
    sites = get_controller(_learner().model).site_names
    conv4 = metaperturb.wrap(metaperturb.models.conv4(num_classes=4), input_size=(3, 16, 16))
    conv4_sites = get_controller(conv4).site_names
    expected = {first["label"]: sites, extra["label"]: conv4_sites}
    assert report["closed_sites"] == {closed: expected}
    assert report["best"] == open_ and report["screened_out"] == [closed]
    assert f"closed at full strength: {closed}" in capsys.readouterr().out


def test_choose_best_screens_closed_candidates_unless_every_one_is() -> None:
    from metaperturb.train.selection import choose_best

    scores = {"a": 0.6, "b": 0.5, "c": 0.4}
    closed = {"a": {"task": ["stages.2.2"]}, "b": {}}
    assert choose_best(scores, closed) == "b"
    assert choose_best(scores, closed, screen=False) == "a"
    assert choose_best({"a": 0.6, "c": 0.7}, {"a": {"t": ["x"]}, "c": {"t": ["y"]}}) == "c"


def test_an_extra_task_with_a_field_that_is_not_a_task_setting_is_refused() -> None:
    from metaperturb.train.selection import SelectConfig

    with pytest.raises(ValueError, match=r"\['clases'\] do not define a validation task"):
        SelectConfig(["phi"], data="d", max_per_class=8, extra_tasks=[{"clases": 3}])
    with pytest.raises(ValueError, match="max_per_class"):  # each task is checked as the first
        SelectConfig(["phi"], data="d", max_per_class=8, extra_tasks=[{"max_per_class": 1}]).tasks()


def test_resume_compares_a_local_data_path_by_the_folder_it_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run started with a relative --data resumes with the absolute path, and vice versa."""
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    relative = TrainConfig(data="data")
    assert relative.differences(TrainConfig(data=str(tmp_path / "data"))) == []
    assert relative.differences(TrainConfig(data="data", seed=1)) == ["seed: run has 0, asked 1"]
    assert TrainConfig(data="org/hub-id").differences(TrainConfig(data="org/other")) != []


@needs_tiny
def test_placement_before_activation_reaches_the_task_networks(tmp_path: Path) -> None:
    """--placement before_activation: phi sits on the residual sums of the task ResNets, the run
    trains, and the model card says where phi was."""
    train(_config(tmp_path, placement="before_activation", steps=2))
    config = json.loads((tmp_path / "train_config.json").read_text())
    assert config["placement"] == "before_activation"
    assert "placement: before_activation" in (tmp_path / "phi" / "README.md").read_text()
    with pytest.raises(ValueError, match="placement must be one of"):
        TrainConfig(data="x", placement="inside")
    plan = metaperturb.get_controller(_learner(placement="before_activation").model).plan
    assert {site.hook for site in plan.sites} == {"input"}
    assert all(site.name.endswith(".act2") for site in plan.sites)


def test_noise_path_alive_reads_zero_for_a_dead_path_and_changes_nothing() -> None:
    """E1 kernels all negative on non-negative block outputs: nothing reaches mu."""
    import timm

    from metaperturb.train.metrics import noise_path_alive

    torch.manual_seed(0)
    model = metaperturb.wrap(
        timm.create_model("cifar_resnet20", num_classes=3),
        phi=metaperturb.Perturbation(),
        input_size=(3, 16, 16),
    )
    phi = metaperturb.get_controller(model).phi
    x = torch.randn(4, 3, 16, 16)
    assert 0 < max(noise_path_alive(model, x).values()) < 1
    with torch.no_grad():
        phi.noise_in.self_weight.fill_(-0.01)
        phi.noise_in.mean_weight.fill_(-0.01)
    before = copy.deepcopy(model.state_dict())
    model.train()
    assert set(noise_path_alive(model, x).values()) == {0.0}
    assert model.training  # the mode it had
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@needs_tiny
def test_channels_last_is_decided_once_and_kept_on_resume(tmp_path: Path) -> None:
    """On a CPU the default trains in channels_last and records it; a run saved before the
    setting existed (no key) resumes in NCHW, the layout it started with."""
    train(_config(tmp_path / "run", steps=2))
    config = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert config["channels_last"] is True
    assert TrainConfig.from_dict({"data": "x"}).channels_last is False
    saved = TrainConfig.from_dict({**config, "channels_last": False})
    asked = _config(tmp_path / "run", steps=4, resume=True)
    assert asked.channels_last is None and saved.differences(asked) == []
    assert saved.differences(dataclasses.replace(asked, channels_last=True)) == [
        "channels_last: run has False, asked True"
    ]
    train(asked)
    assert _load(tmp_path / "run" / "checkpoint.pt")["step"] == 4


def test_a_task_network_in_channels_last_computes_in_it() -> None:
    learner = _learner(channels_last=True)
    conv = next(m for m in learner.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    seen: list[bool] = []
    conv.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    plain = _learner(channels_last=False)
    grads = {id(learner): [torch.zeros_like(p) for p in learner.phi.parameters()]}
    grads[id(plain)] = [torch.zeros_like(p) for p in plain.phi.parameters()]
    for step in range(2):
        learner.step(step, grads[id(learner)])
        plain.step(step, grads[id(plain)])
    assert seen and all(seen)
    # The same function with the noise in another order: both learn, neither is NaN.
    for accumulated in grads.values():
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in accumulated)


def test_a_launch_on_two_kinds_of_machine_names_both() -> None:
    """phi's card says how many processes ran on each kind of machine in each launch."""
    from metaperturb.train.loop import _segment_line

    cpu = {"cpu": "Xeon", "cpu_capability": "AVX512", "threads": 1, "torch": "2.14.1"}
    gpu = {**cpu, "gpu": "NVIDIA H100", "threads": 4}
    line = _segment_line({"from_step": 0, "to_step": 750, "machines": [cpu, cpu, gpu]})
    assert line == (
        "steps 0-750: 2 processes on Xeon (AVX512), 1 thread, torch 2.14.1 "
        "and 1 process on NVIDIA H100, 4 threads, torch 2.14.1"
    )
    unrecorded = {"from_step": 0, "to_step": 300, "machines": None}
    assert _segment_line(unrecorded) == "steps 0-300: not recorded"
