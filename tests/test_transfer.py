"""The evaluation harness: targets, calibration, regularizers, and one run end to end."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from metaperturb import _machine as machine
from metaperturb.diagnostics import ClosedSiteWarning
from metaperturb.errors import RunInProgressError, TrainingStoppedError
from metaperturb.phi import Perturbation
from metaperturb.transfer import (
    DropBlock,
    ManifoldMixup,
    Target,
    TransferConfig,
    calibration,
    find_equivalent_result,
    load_target,
    resolve_target,
    run_id,
    run_transfer,
    stop_on_signals,
)
from metaperturb.transfer import run as run_module
from metaperturb.transfer.reuse import closed_site_twin, trains_as
from metaperturb.transfer.run import UPDATE_BN_BATCHES
from metaperturb.wrapper import get_controller

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST = DATA / "mnist-10k"
needs_mnist = pytest.mark.skipif(not MNIST.is_dir(), reason=f"{MNIST} not present")


def tiny_target() -> dict[str, object]:
    """6 training and 4 test digits of each of 3 classes, from MNIST-10k's single split."""
    return {
        "data": str(MNIST),
        "classes": 3,
        "per_class": 6,
        "test_split": "train",
        "test_skip_per_class": 6,
        "test_per_class": 4,
        "image_size": 16,
        "channels": 1,
    }


def test_a_target_whose_slices_overlap_is_refused() -> None:
    with pytest.raises(ValueError, match="overlap"):
        Target("mnist", per_class=500, test_split="train", test_skip_per_class=100)
    with pytest.raises(ValueError, match="overlap"):
        Target("mnist", test_split="train")
    Target("mnist", per_class=500, test_split="train", test_skip_per_class=500)


def test_presets_resolve_under_a_data_root() -> None:
    target = resolve_target("s-cifar10", "/data")
    assert target.data == "/data/cifar10" and target.per_class == 500
    with pytest.raises(ValueError, match="presets"):
        resolve_target("cifar-11")


@needs_mnist
def test_train_and_test_slices_are_disjoint_and_share_classes() -> None:
    train, test = load_target(Target(**tiny_target()))  # type: ignore[arg-type]
    assert torch.bincount(train.labels).tolist() == [6, 6, 6]
    assert torch.bincount(test.labels).tolist() == [4, 4, 4]
    assert train.original_labels == test.original_labels == [0, 1, 2]
    seen = {bytes(image.numpy()) for image in train.images}
    assert not seen & {bytes(image.numpy()) for image in test.images}


def test_calibration_of_a_known_case() -> None:
    # Two examples at confidence 0.9 (one right), two at 0.6 (both right): bins (0.8, 0.867],
    # (0.867, 0.933] and (0.533, 0.6]... with 10 bins: 0.9 -> bin 8, 0.6 -> bin 5.
    probabilities = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 1, 1])
    report = calibration(probabilities, labels, bins=10)
    expected = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6)
    assert report["ece"] == pytest.approx(expected)
    counts = [b["count"] for b in report["bins"]]
    assert counts[8] == 2 and counts[5] == 2 and sum(counts) == 4
    assert calibration(torch.eye(3), torch.arange(3))["ece"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="labels"):
        calibration(torch.ones(3, 2), torch.zeros(4, dtype=torch.long))


def _small_cnn() -> torch.nn.Module:
    import timm

    import metaperturb.models  # noqa: F401

    return timm.create_model("conv4", num_classes=3, in_chans=1)


def test_dropblock_drops_in_training_only_and_unhooks() -> None:
    """Against the same train-mode forward without it, DropBlock zeroes about ``rate`` of the
    units, in square blocks shared by all channels, and scales the rest by one factor (the ReLU
    alone zeroes half the units, so counting zeros would not tell it from no DropBlock)."""
    torch.manual_seed(0)
    model = _small_cnn()
    x = torch.randn(8, 1, 16, 16)
    # The first site (16x16, so 3x3 blocks fit) sees the same input with and without DropBlock,
    # and in train mode its BatchNorm uses the batch's statistics: the two passes compare.
    first = model.get_submodule(_site_names(model)[0])
    model.eval()
    reference = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = _site_output(model.train(), first, x)
    model.load_state_dict(state)  # a train-mode pass moves BatchNorm's running statistics
    model.eval()
    rate = 0.5
    drop = DropBlock(model, rate=rate, block_size=3, input_size=(1, 16, 16))
    assert len(drop.handles) == 4  # after each of conv4's blocks
    assert torch.equal(model(x), reference)  # eval: no effect
    dropped = _site_output(model.train(), first, x)
    positive = plain > 0
    zeroed = ((dropped == 0) & positive).float().sum() / positive.float().sum()
    assert abs(zeroed.item() - rate) < 0.15, zeroed  # 0.48 here
    # One mask for all channels (no position has every channel zero without DropBlock), made of
    # blocks: every dropped position lies in a dropped 2x2 square (3x3 inside the map, cut at its
    # edges). Units dropped one by one would not.
    assert not (plain == 0).all(dim=1).any()
    mask = (dropped == 0).all(dim=1, keepdim=True).float()
    assert abs(mask.mean().item() - rate) < 0.15, mask.mean()
    squares = 1.0 - F.max_pool2d(1.0 - mask, kernel_size=2, stride=1)
    assert torch.equal(F.max_pool2d(squares, kernel_size=2, stride=1, padding=1), mask)
    # The kept units are the plain ones scaled up by one factor, 1 / (fraction kept).
    kept = mask.expand_as(dropped) == 0
    scale = 1.0 / (1.0 - mask.mean())
    assert torch.allclose(dropped[kept], plain[kept] * scale, rtol=1e-4, atol=1e-6)
    drop.remove()
    model.load_state_dict(state)
    model.eval()
    assert torch.equal(model(x), reference)


def _site_names(model: torch.nn.Module) -> list[str]:
    from metaperturb.discovery import plan_sites

    return [site.name for site in plan_sites(model, input_size=(1, 16, 16)).sites]


def _site_output(model: torch.nn.Module, site: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``site`` hands on in one forward of ``model`` (after the hooks already on it)."""
    outputs: list[torch.Tensor] = []
    handle = site.register_forward_hook(lambda m, a, out: outputs.append(out.detach()))
    try:
        model(x)
    finally:
        handle.remove()
    return outputs[-1]


def test_manifold_mixup_mixes_inside_loss_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """loss() mixes the features, not only the labels: with lambda, the partners and the layer
    pinned, the logits are those of ``lam * h + (1 - lam) * h[perm]`` at that layer (the input
    for layer 0), and the loss mixes the cross-entropies of both label sets on them."""
    torch.manual_seed(0)
    model = _small_cnn().eval()  # eval: BatchNorm does not see the mix in its statistics
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 3, (8,))
    plain = model(x)
    mixup = ManifoldMixup(model, alpha=1.0, input_size=(1, 16, 16))
    assert mixup.layers == 5  # the input and conv4's four blocks
    assert torch.equal(model(x), plain)  # outside loss(): untouched
    losses = {round(mixup.loss(x, y).item(), 5) for _ in range(6)}
    assert len(losses) > 1  # a new layer, lambda and partner every batch
    assert F.cross_entropy(plain, y).item() not in losses

    lam, perm = 0.3, torch.roll(torch.arange(8), 1)  # every example mixed with another
    sites = [model.get_submodule(site) for site in _site_names(model)]

    def mix(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return lam * output + (1 - lam) * output[perm]

    logits: list[torch.Tensor] = []
    capture = model.register_forward_hook(lambda m, a, out: logits.append(out.detach()))
    for layer in range(mixup.layers):
        if layer == 0:
            expected = model(lam * x + (1 - lam) * x[perm])
        else:
            handle = sites[layer - 1].register_forward_hook(mix)
            expected = model(x)
            handle.remove()
        assert (expected - plain).abs().max() > 1e-3, layer  # mixing there changes the logits
        logits.clear()
        with monkeypatch.context() as patched:
            patched.setattr(torch.distributions.Beta, "sample", lambda *a, **k: torch.tensor(lam))
            patched.setattr(torch, "randperm", lambda *a, **k: perm.clone())
            patched.setattr(torch, "randint", lambda *a, k=layer, **_: torch.tensor(k))
            loss = mixup.loss(x, y)
        assert len(logits) == 1 and torch.allclose(logits[0], expected, atol=1e-5), layer
        mixed = lam * F.cross_entropy(expected, y) + (1 - lam) * F.cross_entropy(expected, y[perm])
        assert loss.item() == pytest.approx(mixed.item(), abs=1e-5), layer
    capture.remove()
    mixup.remove()
    assert torch.equal(model(x), plain)


@needs_mnist
def test_a_run_writes_its_result_and_is_not_repeated(tmp_path: Path) -> None:
    phi_folder = Perturbation().save_pretrained(tmp_path / "phi")
    config = TransferConfig(
        target=tiny_target(),
        model="conv4",
        phi=str(phi_folder),
        phi_name="fresh",
        steps=6,
        batch_size=8,
        curve_every=3,
        curve_images=5,
        mc_samples=[2],
        checkpoint_every=2,
    )
    result = run_transfer(config, tmp_path / "results", progress=False)
    path = tmp_path / "results" / f"{run_id(config)}.json"
    assert json.loads(path.read_text())["accuracy"] == result["accuracy"]
    assert result["method"] == "metaperturb[fresh]" and result["test_images"] == 12
    assert set(result["evaluation"]) == {"default", "sample", "off", "mc2", "update_bn"}
    assert result["evaluation"]["default"]["mode"] == "expectation"
    assert result["evaluation"]["update_bn"]["batches"] == UPDATE_BN_BATCHES
    # Each evaluation is another computation, not the default under another name: phi's noise
    # at its mean, sampled once, left out, averaged over two samples (the first of which is the
    # single "sample" pass, same seed), and the default after recomputed BatchNorm statistics.
    nll = {mode: scores["nll"] for mode, scores in result["evaluation"].items()}
    for mode in ("sample", "off", "mc2", "update_bn"):
        assert abs(nll[mode] - nll["default"]) > 1e-4, (mode, nll)
    assert abs(nll["sample"] - nll["off"]) > 1e-4, nll
    assert abs(nll["mc2"] - nll["sample"]) > 1e-4, nll  # more than one pass
    assert [point["step"] for point in result["curve"]] == [3, 6]
    assert len(result["scales"]) == 4 and all(0 < s < 1 for s in result["scales"].values())
    assert len(result["phi_fingerprint"]) == 64
    assert result["eval_clip"] == 100.0  # the library's default: the training clamp holds in eval
    assert not list((tmp_path / "results").glob("*.ckpt"))  # removed when done
    stamp = path.stat().st_mtime_ns
    assert run_transfer(config, tmp_path / "results", progress=False) == result
    assert path.stat().st_mtime_ns == stamp


def stopped_at(
    step: int, config: TransferConfig, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Run ``config`` in ``folder`` until its checkpoint of ``step`` is written, then stop it as
    a kill would; returns that checkpoint."""
    original = run_module.TransferRun.save_checkpoint

    def stop_after_the_checkpoint(self: run_module.TransferRun) -> None:
        original(self)
        if self.step == step:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(run_module.TransferRun, "save_checkpoint", stop_after_the_checkpoint)
        run_transfer(config, folder, progress=False)
    return folder / f"{run_id(config)}.ckpt"


@needs_mnist
def test_a_checkpoint_older_than_the_segment_record_leaves_its_part_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = TransferConfig(
        target=tiny_target(), model="conv4", steps=4, batch_size=8, checkpoint_every=2
    )
    checkpoint = stopped_at(2, config, tmp_path, monkeypatch)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    del state["segments"]  # as the checkpoints written before 2026-12-07 are
    torch.save(state, checkpoint)
    result = run_transfer(config, tmp_path, progress=False)
    assert [(s["from_step"], s["to_step"]) for s in result["segments"]] == [(0, 2), (2, 4)]
    assert result["segments"][0]["machine"] is None
    assert result["segments"][1]["machine"] == result["machine"]


def _python(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter: flushing denormals is process state, set before the
    intra-op threads start, which this test process has long since started."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_flushing_denormals_reaches_every_thread_and_is_recorded() -> None:
    flushed = _python(
        "import json, torch\n"
        "from metaperturb import _machine as m\n"
        "m.flush_denormals()\n"
        "torch.set_num_threads(2)\n"
        "record = m.describe(torch.device('cpu'), False)\n"
        "print(json.dumps([m.flushes_denormals(), record['flush_denormal'], "
        "m.label(record)]))"
    )
    assert flushed.returncode == 0, flushed.stderr
    after, recorded, label = json.loads(flushed.stdout)
    assert (after, recorded) == (True, True)
    assert label.endswith(f"2 threads, denormals flushed to zero, torch {torch.__version__}")
    assert "flushed" not in machine.label(machine.describe(torch.device("cpu"), False))

    # Asked for after the thread pool started, only the main thread would flush: refused, and
    # the mode is left as it was rather than half on.
    late = _python(
        "import torch\n"
        "from metaperturb import _machine as m\n"
        "torch.set_num_threads(2)\n"
        "torch.ones(10**6).mul_(2)\n"
        "try:\n"
        "    m.flush_denormals()\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
        "denormal = torch.tensor([1 << 20], dtype=torch.int32).view(torch.float32)\n"
        "print((denormal * 1.0).item() != 0)"
    )
    assert late.returncode == 0, late.stderr
    message, mode_off = late.stdout.strip().splitlines()
    assert "not on torch's intra-op threads" in message and "before any torch" in message
    assert mode_off == "True"


@needs_mnist
def test_eval_flush_denormal_is_recorded_in_the_runs_segments(tmp_path: Path) -> None:
    args = ["eval", "--data", str(MNIST), "--test-split", "train", "--classes", "2"]
    args += ["--per-class", "4", "--test-skip-per-class", "4", "--test-per-class", "2"]
    args += ["--size", "16", "--channels", "1", "--model", "conv4", "--steps", "2"]
    args += ["--batch-size", "4", "--curve-every", "0", "--output-dir", str(tmp_path)]
    args += ["--no-progress", "--threads", "2"]
    for flush in (False, True):
        command = [*args, "--seed", str(int(flush))] + (["--flush-denormal"] if flush else [])
        done = subprocess.run(
            [sys.executable, "-m", "metaperturb", *command],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert "flush" not in summary["id"]  # a setting of the machine, not of the run
        result = json.loads((tmp_path / f"{summary['id']}.json").read_text())
        assert result["machine"]["flush_denormal"] is flush
        assert [s["machine"]["flush_denormal"] for s in result["segments"]] == [flush]


@needs_mnist
def test_a_stopped_run_resumes_to_the_same_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = TransferConfig(
        target=tiny_target(),
        model="conv4",
        mixup_alpha=1.0,
        steps=6,
        batch_size=8,
        curve_every=2,
        curve_images=5,
        checkpoint_every=2,
    )
    whole = run_transfer(config, tmp_path / "whole", progress=False)

    assert stopped_at(4, config, tmp_path / "split", monkeypatch).is_file()
    resumed = run_transfer(config, tmp_path / "split", progress=False)
    assert resumed["resumed"] and not whole["resumed"]
    assert resumed["curve"] == whole["curve"]
    assert resumed["evaluation"]["default"]["nll"] == pytest.approx(
        whole["evaluation"]["default"]["nll"], abs=1e-6
    )

    # Where each part ran: the whole run in one process, the split one in two.
    assert [(s["from_step"], s["to_step"]) for s in whole["segments"]] == [(0, 6)]
    assert [(s["from_step"], s["to_step"]) for s in resumed["segments"]] == [(0, 4), (4, 6)]
    first = resumed["segments"][0]["machine"]
    assert first["cpu"] == machine.cpu_model() and first["threads"] == torch.get_num_threads()
    assert first["cpu_features"] == machine.cpu_features()
    assert first["cpu_capability"] == torch.backends.cpu.get_cpu_capability()

    # Stopped during the evaluation: the rerun starts from the trained network.
    original_evaluate = run_module.TransferRun.evaluate

    def stop_in_evaluation(self: run_module.TransferRun) -> dict[str, Any]:
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module.TransferRun, "evaluate", stop_in_evaluation)
    with pytest.raises(KeyboardInterrupt):
        run_transfer(config, tmp_path / "late", progress=False)
    checkpoint = torch.load(
        tmp_path / "late" / f"{run_id(config)}.ckpt", map_location="cpu", weights_only=True
    )
    assert checkpoint["step"] == config.steps
    monkeypatch.setattr(run_module.TransferRun, "evaluate", original_evaluate)
    # The checkpoint holds the training only: it refuses another training setting, and serves a
    # rerun that asks for more evaluation.
    config.lr = 0.01
    with pytest.raises(ValueError, match=r"\.ckpt was made with other settings .*lr"):
        run_transfer(config, tmp_path / "late", progress=False)
    config.lr = TransferConfig.lr
    config.eval_modes = False
    late = run_transfer(config, tmp_path / "late", progress=False)
    assert late["resumed"] and late["curve"] == whole["curve"]
    assert late["evaluation"]["default"]["nll"] == pytest.approx(
        whole["evaluation"]["default"]["nll"], abs=1e-6
    )


@needs_mnist
def test_the_scales_at_full_strength_are_recorded_once_and_survive_a_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """s per site at the end of the ramp (what screens a phi for a site closed at full
    strength): read at the step the strength reaches 1, kept through a stop on either side."""
    config = TransferConfig(
        **{**two_step_conv4(), "steps": 10, "checkpoint_every": 2}, phi="default", phi_name="x"
    )
    whole = run_transfer(config, tmp_path / "whole", progress=False)
    assert whole["full_strength_step"] == 4  # ramp over 40% of 10 steps
    recorded = whole["scales_at_full_strength"]
    assert set(recorded) == set(whole["scales"]) and all(0 < v < 1 for v in recorded.values())
    original = run_module.TransferRun.save_checkpoint
    for stop_at in (2, 6):  # before and after the record

        def stop(self: run_module.TransferRun, stop_at: int = stop_at) -> None:
            original(self)
            if self.step == stop_at:
                raise KeyboardInterrupt

        monkeypatch.setattr(run_module.TransferRun, "save_checkpoint", stop)
        with pytest.raises(KeyboardInterrupt):
            run_transfer(config, tmp_path / f"split{stop_at}", progress=False)
        monkeypatch.setattr(run_module.TransferRun, "save_checkpoint", original)
        resumed = run_transfer(config, tmp_path / f"split{stop_at}", progress=False)
        assert resumed["resumed"] and resumed["full_strength_step"] == 4
        assert resumed["scales_at_full_strength"] == pytest.approx(recorded, abs=1e-6)
    base = run_transfer(TransferConfig(**two_step_conv4()), tmp_path / "base", progress=False)
    assert base["scales_at_full_strength"] is None and base["full_strength_step"] is None
    # A checkpoint from before the record existed, past the ramp: no later step stands in.
    monkeypatch.setattr(run_module.TransferRun, "save_checkpoint", stop)  # stops at step 6
    with pytest.raises(KeyboardInterrupt):
        run_transfer(config, tmp_path / "old", progress=False)
    monkeypatch.setattr(run_module.TransferRun, "save_checkpoint", original)
    path = tmp_path / "old" / f"{run_id(config)}.ckpt"
    state = torch.load(path, weights_only=True)
    del state["full_strength_scales"]
    torch.save(state, path)
    old = run_transfer(config, tmp_path / "old", progress=False)
    assert old["full_strength_step"] == 4 and old["scales_at_full_strength"] is None
    # No ramp: full strength from the first step, recorded after it.
    flat = TransferConfig(**{**config.__dict__, "ramp_fraction": 0.0})
    assert run_transfer(flat, tmp_path / "flat", progress=False)["full_strength_step"] == 1


class StopAfter(threading.Event):
    """A stop request that reads as set from its ``checks + 1``-th look on (a run looks once
    a training step, then once per evaluation batch)."""

    def __init__(self, checks: int) -> None:
        super().__init__()
        self.checks = checks

    def is_set(self) -> bool:
        self.checks -= 1
        return self.checks < 0


@needs_mnist
def test_a_run_asked_to_stop_checkpoints_the_step_it_is_at(tmp_path: Path) -> None:
    """SIGTERM in a sweep (``stop_on_signals``) loses no step: the run stops after step 3, off
    the checkpoint schedule and between two curve points, and resumes to the uninterrupted
    result; asked during the evaluation it stops there and the rerun only evaluates."""
    phi = Perturbation()
    phi.save_pretrained(tmp_path / "phi")
    config = TransferConfig(
        target=tiny_target(),
        model="conv4",
        phi=str(tmp_path / "phi"),
        steps=6,
        batch_size=8,
        curve_every=2,
        curve_images=5,
        checkpoint_every=0,
        eval_modes=False,
    )
    whole = run_transfer(config, tmp_path / "whole", progress=False)
    split = tmp_path / "split"
    with pytest.raises(TrainingStoppedError, match="stopped at step 3 of 6"):
        run_transfer(config, split, progress=False, stop=StopAfter(2))
    checkpoint = torch.load(split / f"{run_id(config)}.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["step"] == 3
    assert not (split / f"{run_id(config)}.lock").exists()  # released for the next process
    with pytest.raises(TrainingStoppedError, match="during its evaluation"):
        run_transfer(config, split, progress=False, stop=StopAfter(3))
    assert not (split / f"{run_id(config)}.json").exists()
    resumed = run_transfer(config, split, progress=False)
    assert resumed["curve"] == whole["curve"]
    assert resumed["evaluation"]["default"]["nll"] == pytest.approx(
        whole["evaluation"]["default"]["nll"], abs=1e-6
    )


@needs_mnist
def test_a_non_finite_loss_ends_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loss is read in batches of steps (no GPU sync a step), yet a NaN still ends the run
    with the steps it fell in, and the weights it reached are never checkpointed."""
    config = TransferConfig(
        target=tiny_target(),
        model="conv4",
        steps=6,
        batch_size=8,
        curve_every=0,
        checkpoint_every=2,
        eval_modes=False,
    )
    losses = 0
    cross_entropy = F.cross_entropy

    def nan_from_the_fourth_step(*args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal losses
        losses += 1
        loss = cross_entropy(*args, **kwargs)
        return loss * math.nan if losses == 4 else loss

    monkeypatch.setattr(run_module.F, "cross_entropy", nan_from_the_fourth_step)
    with pytest.raises(FloatingPointError, match="loss was nan in steps 3-4"):
        run_transfer(config, tmp_path, progress=False)
    checkpoint = torch.load(
        tmp_path / f"{run_id(config)}.ckpt", map_location="cpu", weights_only=True
    )
    assert checkpoint["step"] == 2 and checkpoint["loss_count"] == 2
    assert math.isfinite(checkpoint["loss_sum"])
    assert all(
        torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point()
    )
    assert not (tmp_path / f"{run_id(config)}.json").exists()


@needs_mnist
def test_a_network_that_predicts_only_nan_gets_no_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Non-finite predictions count as wrong and are counted; when every one is, there is no
    accuracy to record (0% would read as a result), so the run raises and writes no JSON."""
    config = TransferConfig(
        target=tiny_target(), model="conv4", steps=2, batch_size=8, curve_every=0, eval_modes=False
    )
    real = run_module.TransferRun._scores

    def all_nan(self: run_module.TransferRun, probabilities: torch.Tensor, seconds: float) -> dict:
        return real(self, probabilities * math.nan, seconds)

    monkeypatch.setattr(run_module.TransferRun, "_scores", all_nan)
    with pytest.raises(FloatingPointError, match="every test prediction .* is NaN or infinite"):
        run_transfer(config, tmp_path, progress=False)
    assert not (tmp_path / f"{run_id(config)}.json").exists()
    (tmp_path / f"{run_id(config)}.json").write_text('{"id": "cut sho')
    with pytest.raises(ValueError, match="is not a readable run result"):
        run_transfer(config, tmp_path, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_mnist
@pytest.mark.parametrize(
    "method", [{"phi": "default"}, {"mixup_alpha": 1.0}, {"dropblock_rate": 0.1}], ids=str
)
def test_training_steps_queue_their_work_without_waiting_for_the_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: dict[str, Any]
) -> None:
    """Between two reads of the loss a step never waits for the GPU (pytorch#120996 lists what
    does): the host runs ahead, so small networks keep the GPU busy."""
    config = TransferConfig(
        target=tiny_target(),
        model="conv4",
        steps=8,
        batch_size=8,
        curve_every=0,
        checkpoint_every=0,
        eval_modes=False,
        device="cuda",
        **method,
    )
    run = run_module.TransferRun(config, tmp_path, None)
    config.steps = 1
    run.train(progress=False)  # warm-up: cuDNN's choices, the first pinned buffer
    settle = run_module.TransferRun._settle_losses

    def settle_may_wait(self: run_module.TransferRun) -> None:
        torch.cuda.set_sync_debug_mode("default")
        settle(self)

    monkeypatch.setattr(run_module.TransferRun, "_settle_losses", settle_may_wait)
    config.steps = 8
    torch.cuda.set_sync_debug_mode("error")
    try:
        run.train(progress=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert run.step == 8 and run.loss_count == 8 and math.isfinite(run.loss_sum)


def test_stop_on_signals_asks_once_then_ends_and_restores_the_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5)  # asked, not ended
        with pytest.raises(SystemExit) as ended:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode; never reached
        assert ended.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


@needs_mnist
def test_channels_last_is_a_speed_setting(tmp_path: Path) -> None:
    """Without phi (no noise) the layout gives the same network to float rounding, a result made
    in one layout answers the other, and a CPU run defaults to channels_last."""
    common: dict[str, Any] = {
        "target": tiny_target(),
        "model": "conv4",
        "steps": 4,
        "batch_size": 8,
        "curve_every": 0,
        "device": "cpu",
    }
    nchw = run_transfer(
        TransferConfig(channels_last=False, **common), tmp_path / "a", progress=False
    )
    last = run_transfer(
        TransferConfig(channels_last=True, **common), tmp_path / "b", progress=False
    )
    assert (nchw["machine"]["channels_last"], last["machine"]["channels_last"]) == (False, True)
    assert last["evaluation"]["default"]["nll"] == pytest.approx(
        nchw["evaluation"]["default"]["nll"], abs=1e-4
    )
    assert last["accuracy"] == nchw["accuracy"]
    assert run_transfer(TransferConfig(**common), tmp_path / "a", progress=False) == nchw
    default = run_transfer(TransferConfig(**common), tmp_path / "c", progress=False)
    assert default["machine"]["channels_last"] is True


@needs_mnist
def test_eval_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from metaperturb.cli import main

    args = ["eval", "--data", str(MNIST), "--test-split", "train", "--classes", "2"]
    args += ["--per-class", "4", "--test-skip-per-class", "4", "--test-per-class", "2"]
    args += ["--size", "16", "--channels", "1", "--model", "conv4", "--steps", "2"]
    args += ["--batch-size", "4", "--dropblock-rate", "0.1", "--curve-every", "0"]
    args += ["--output-dir", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["id"].startswith("mnist-10k-")
    assert summary["id"].endswith("__conv4__dropblock[0.1,3]__2steps__seed0")
    assert (tmp_path / f"{summary['id']}.json").is_file()
    assert not (tmp_path / f"{summary['id']}.safetensors").exists()
    assert main([*args, "--seed", "1", "--save-weights"]) == 0
    kept = json.loads(capsys.readouterr().out)["id"]
    assert (tmp_path / f"{kept}.safetensors").is_file()
    assert main(["eval", "--target", "s-cifar10", "--data", str(MNIST)]) == 1
    # --exclude reaches wrap: a name that is no site is refused with the sites listed.
    phi = [*args[: args.index("--dropblock-rate")], "--curve-every", "0", "--phi", "default"]
    phi += ["--phi-name", "x", "--output-dir", str(tmp_path), "--no-progress"]
    assert main([*phi, "--exclude", "blocks.3.act"]) == 0
    assert "__conv4__metaperturb[x,without-blocks.3.act]__" in capsys.readouterr().out
    assert main([*phi, "--exclude", "fc"]) == 1
    assert "Its sites: ['blocks.0.act'" in capsys.readouterr().err
    assert main([*phi, "--on-closed-site", "exclude"]) == 0
    guarded = json.loads(capsys.readouterr().out)
    assert "__conv4__metaperturb[x,exclude-closed]__" in guarded["id"]
    result = json.loads((tmp_path / f"{guarded['id']}.json").read_text())
    assert result["excluded_sites"] == {}  # 2 steps: no check ran


@needs_mnist
def test_a_result_made_with_other_settings_is_not_reused(tmp_path: Path) -> None:
    """The run id names the main settings only: a changed lr must not pick up the old result."""
    config = TransferConfig(
        target=tiny_target(), model="conv4", steps=2, batch_size=4, curve_every=0
    )
    run_transfer(config, tmp_path, progress=False)
    config.device = "cpu"  # does not change what is computed: the result is reused
    assert run_transfer(config, tmp_path, progress=False)["steps"] == 2
    config.lr = 0.01
    with pytest.raises(ValueError, match="other settings .*lr: file has 0.001, asked 0.01"):
        run_transfer(config, tmp_path, progress=False)


@needs_mnist
def test_a_result_is_reused_by_phi_numbers_not_by_phi_path(tmp_path: Path) -> None:
    """Moved to another folder (another machine), phi's results are reused; replaced by other
    numbers at the same path, they are refused."""
    phi = Perturbation()
    phi.save_pretrained(tmp_path / "here" / "phi")
    config = TransferConfig(
        target=tiny_target(),
        model="conv4",
        phi=str(tmp_path / "here" / "phi"),
        phi_name="candidate",
        steps=2,
        batch_size=4,
        curve_every=0,
        eval_modes=False,
    )
    first = run_transfer(config, tmp_path / "results", progress=False)
    phi.save_pretrained(tmp_path / "there" / "phi")
    config.phi = str(tmp_path / "there" / "phi")
    assert run_transfer(config, tmp_path / "results", progress=False) == first
    with torch.no_grad():
        phi.scale_weight.add_(0.1)
    phi.save_pretrained(tmp_path / "there" / "phi")
    with pytest.raises(ValueError, match="made with another phi"):
        run_transfer(config, tmp_path / "results", progress=False)


def two_step_conv4() -> dict[str, Any]:
    """Settings of a two-step Conv4 run on the tiny target, without phi."""
    return {
        "target": tiny_target(),
        "model": "conv4",
        "steps": 2,
        "batch_size": 4,
        "curve_every": 0,
        "eval_modes": False,
    }


@needs_mnist
def test_a_phi_evaluated_under_another_name_is_not_run_again(tmp_path: Path) -> None:
    """A phi* candidate's result answers the run of the same numbers under another name (the
    installed phi*); other numbers under that name are a new run."""
    phi = Perturbation()
    phi.save_pretrained(tmp_path / "seed-1" / "phi")
    phi.save_pretrained(tmp_path / "installed")
    common = two_step_conv4()
    candidate = TransferConfig(phi=str(tmp_path / "seed-1" / "phi"), phi_name="seed-1", **common)
    first = run_transfer(candidate, tmp_path / "results", progress=False)
    installed = TransferConfig(phi=str(tmp_path / "installed"), phi_name="phi-star", **common)
    found = find_equivalent_result(installed, tmp_path / "results")
    assert found is not None and found.name == f"{run_id(candidate)}.json"
    assert run_transfer(installed, tmp_path / "results", progress=False) == first
    assert not (tmp_path / "results" / f"{run_id(installed)}.json").exists()
    longer = TransferConfig(**{**common, "steps": 3}, phi=str(tmp_path / "installed"))
    assert find_equivalent_result(longer, tmp_path / "results") is None
    with torch.no_grad():
        phi.scale_weight.add_(0.1)
    phi.save_pretrained(tmp_path / "installed")
    assert find_equivalent_result(installed, tmp_path / "results") is None


@needs_mnist
def test_a_result_scored_more_ways_answers_a_run_that_asks_for_fewer(tmp_path: Path) -> None:
    """The same training evaluated with MC-3 besides the default answers the run that asks for
    the default only (the `datasets` sweep after `priority`), under any phi name; a run asking
    for an evaluation the result lacks is a new run, and so is other training."""
    phi = Perturbation()
    phi.save_pretrained(tmp_path / "phi")
    common = {**two_step_conv4(), "phi": str(tmp_path / "phi")}
    results = tmp_path / "results"
    scored = run_transfer(
        TransferConfig(**common, phi_name="seed-1", mc_samples=[3]), results, progress=False
    )
    plain = TransferConfig(**common, phi_name="phi-star")
    assert find_equivalent_result(plain, results) is not None
    assert run_transfer(plain, results, progress=False) == scored  # read back, not retrained
    same_name = TransferConfig(**common, phi_name="seed-1")  # same id, fewer evaluations
    assert run_transfer(same_name, results, progress=False) == scored
    assert find_equivalent_result(TransferConfig(**common, mc_samples=[3, 5]), results) is None
    assert find_equivalent_result(TransferConfig(**{**common, "eval_modes": True}), results) is None
    assert find_equivalent_result(TransferConfig(**{**common, "lr": 0.01}), results) is None
    with pytest.raises(ValueError, match="mc_samples"):
        run_transfer(
            TransferConfig(**common, phi_name="seed-1", mc_samples=[5]), results, progress=False
        )
    assert sorted(p.name for p in results.iterdir()) == [f"{run_id(same_name)}.json"]


@needs_mnist
def test_a_run_another_process_holds_is_refused_and_released_after(tmp_path: Path) -> None:
    """Two sweeps on one results folder: the second skips the run the first is training."""
    config = TransferConfig(**two_step_conv4())
    results = tmp_path / "results"
    results.mkdir()
    lock = results / f"{run_id(config)}.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        with pytest.raises(RunInProgressError, match=str(holder.pid)):
            run_transfer(config, results, progress=False)
        assert sorted(p.name for p in results.iterdir()) == [lock.name]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    result = run_transfer(config, results, progress=False)  # its owner is gone: taken over
    assert sorted(p.name for p in results.iterdir()) == [f"{run_id(config)}.json"]
    assert result["steps"] == 2


@needs_mnist
def test_a_result_older_than_a_setting_counts_as_that_settings_default(tmp_path: Path) -> None:
    """A result file written before ``placement`` existed was made with its default: the same
    phi under another name must find it, and a non-default placement must not."""
    phi = Perturbation()
    phi.save_pretrained(tmp_path / "seed-1" / "phi")
    common = two_step_conv4()
    candidate = TransferConfig(phi=str(tmp_path / "seed-1" / "phi"), phi_name="seed-1", **common)
    run_transfer(candidate, tmp_path / "results", progress=False)
    path = tmp_path / "results" / f"{run_id(candidate)}.json"
    result = json.loads(path.read_text())
    del result["config"]["placement"]
    path.write_text(json.dumps(result))
    installed = TransferConfig(phi=str(tmp_path / "seed-1" / "phi"), phi_name="phi-star", **common)
    assert find_equivalent_result(installed, tmp_path / "results") == path
    moved = TransferConfig(
        phi=str(tmp_path / "seed-1" / "phi"),
        phi_name="phi-star",
        placement="before_activation",
        **common,
    )
    assert find_equivalent_result(moved, tmp_path / "results") is None
    # A list setting too (its default comes from a factory): a run that leaves a site out is
    # not answered by a result that predates ``exclude``.
    result = json.loads(path.read_text())
    del result["config"]["exclude"]
    path.write_text(json.dumps(result))
    assert find_equivalent_result(installed, tmp_path / "results") == path
    trimmed = TransferConfig(
        phi=str(tmp_path / "seed-1" / "phi"),
        phi_name="phi-star",
        exclude=["blocks.3.act"],
        **common,
    )
    assert find_equivalent_result(trimmed, tmp_path / "results") is None


@needs_mnist
def test_a_checkpoint_made_with_other_phi_numbers_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    phi = Perturbation()
    phi.save_pretrained(tmp_path / "phi")
    config = TransferConfig(
        target=tiny_target(),
        model="conv4",
        phi=str(tmp_path / "phi"),
        steps=4,
        batch_size=4,
        curve_every=0,
        eval_modes=False,
        checkpoint_every=2,
    )
    original = run_module.TransferRun.save_checkpoint

    def stop_after_saving(self: run_module.TransferRun) -> None:
        original(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module.TransferRun, "save_checkpoint", stop_after_saving)
    with pytest.raises(KeyboardInterrupt):
        run_transfer(config, tmp_path / "results", progress=False)
    monkeypatch.setattr(run_module.TransferRun, "save_checkpoint", original)
    with torch.no_grad():
        phi.noise_in.self_weight.add_(0.1)
    phi.save_pretrained(tmp_path / "phi")
    with pytest.raises(ValueError, match=r"\.ckpt was made with another phi"):
        run_transfer(config, tmp_path / "results", progress=False)


def test_the_placement_is_part_of_the_method_and_the_run_id() -> None:
    common: dict[str, Any] = {"target": "s-cifar10", "phi": "runs/x/phi", "phi_name": "x"}
    before = TransferConfig(placement="before_activation", **common)
    assert before.method == "metaperturb[x,pre-act]"
    assert run_id(before) != run_id(TransferConfig(**common))
    assert TransferConfig(**common).method == "metaperturb[x]"


def _phi_star_settings(steps: int) -> dict[str, Any]:
    """A ResNet-20 with phi* (labelled ``x``) on the tiny target, for the run-id and setup tests."""
    return {
        "target": tiny_target(),
        "phi": "default",
        "phi_name": "x",
        "steps": steps,
        "model": "cifar_resnet20",
    }


@needs_mnist
def test_exclude_names_the_run_and_leaves_those_sites_without_phi(tmp_path: Path) -> None:
    """The remedy for a site whose s closes (docs/evaluation.md, Omniglot-100): every other site
    is wrapped, and the method says which was left out."""
    common = _phi_star_settings(steps=2)
    every = run_module.TransferRun(TransferConfig(**common), tmp_path).model
    sites = get_controller(every).site_names
    trimmed = TransferConfig(exclude=[sites[-1]], **common)
    assert trimmed.method == f"metaperturb[x,without-{sites[-1]}]"
    assert run_id(trimmed) != run_id(TransferConfig(**common))
    model = run_module.TransferRun(trimmed, tmp_path).model
    assert get_controller(model).site_names == sites[:-1]


@needs_mnist
def test_exclude_closed_names_the_run_and_a_resumed_run_keeps_the_sites_it_switched_off(
    tmp_path: Path,
) -> None:
    """The remedy that needs no knowledge of the site: the scheduler switches a closing site
    off; a run stopped after that resumes with the same site off (the model's state) and the
    step it happened (the scheduler's)."""
    common = _phi_star_settings(steps=2)
    config = TransferConfig(on_closed_site="exclude", **common)
    assert config.method == "metaperturb[x,exclude-closed]"
    assert run_id(config) != run_id(TransferConfig(**common))
    run = run_module.TransferRun(config, tmp_path)
    assert run.strength is not None and run.strength.on_closed_site == "exclude"
    last = get_controller(run.model).site_names[-1]
    get_controller(run.model).sites[-1].running_var.fill_(1_000.0)  # type: ignore[operator]
    run.strength.check_every = 1
    with pytest.warns(ClosedSiteWarning, match="switched off"):
        run.strength.step()
    run.save_checkpoint()
    resumed = run_module.TransferRun(config, tmp_path)
    assert resumed.maybe_resume() and resumed.strength is not None
    assert resumed.strength.excluded == {last: 1}
    sites = get_controller(resumed.model).site_names
    assert get_controller(resumed.model).excluded_sites == {sites.index(last)}


@needs_mnist
def test_exclude_closed_from_names_the_run_and_reaches_the_scheduler(tmp_path: Path) -> None:
    """Switching closed sites off from a strength on is a third closed-site setting: its own
    run id, passed to the scheduler, and refused without ``on_closed_site="exclude"``."""
    common = _phi_star_settings(steps=2)
    late = TransferConfig(on_closed_site="exclude", exclude_closed_from=0.5, **common)
    assert late.method == "metaperturb[x,exclude-closed-from0.5]"
    early = TransferConfig(on_closed_site="exclude", **common)
    assert len({run_id(late), run_id(early), run_id(TransferConfig(**common))}) == 3
    run = run_module.TransferRun(late, tmp_path)
    assert run.strength is not None and run.strength.exclude_from == 0.5
    with pytest.raises(ValueError, match="on_closed_site='exclude'"):
        run_module.TransferRun(TransferConfig(exclude_closed_from=0.5, **common), tmp_path)
    # A run of it in which no site closed is the as-published run too (the report's twin).
    result = {
        "id": run_id(late),
        "method": late.method,
        "config": {"phi": "x", "on_closed_site": "exclude", "exclude_closed_from": 0.5},
        "closed_sites": {},
    }
    twin = closed_site_twin(result, "warn")
    assert twin is not None and twin["method"] == "metaperturb[x]"
    assert twin["id"] == run_id(TransferConfig(**common))
    assert twin["config"]["on_closed_site"] == "warn" and not twin["config"]["exclude_closed_from"]


@needs_mnist
def test_a_run_in_which_no_site_closed_answers_the_other_closed_site_setting(
    tmp_path: Path,
) -> None:
    """The two settings differ only once a site closes: until then they train the same network
    (checked every step here), so a result whose run found none closed answers the other
    setting's run; one in which a site closed does not."""
    common = {**_phi_star_settings(steps=3), "batch_size": 8, "curve_every": 0}
    networks = []
    for setting in ("warn", "exclude"):
        run = run_module.TransferRun(TransferConfig(on_closed_site=setting, **common), tmp_path)
        assert run.strength is not None
        run.strength.check_every = 1
        run.train(progress=False)
        assert run.strength.closed == {}
        networks.append(run.model.state_dict())
    for key, tensor in networks[0].items():
        assert torch.equal(tensor, networks[1][key]), key

    results = tmp_path / "results"
    settings = {**two_step_conv4(), "phi": "default", "phi_name": "x"}
    warned = TransferConfig(**settings)
    first = run_transfer(warned, results, progress=False)
    assert first["closed_sites"] == {} and first["excluded_sites"] == {}
    assert first["closed_sites_last"] == {}
    switching = TransferConfig(on_closed_site="exclude", **settings)
    assert run_transfer(switching, results, progress=False) == first
    assert not (results / f"{run_id(switching)}.json").exists()
    saved = results / f"{run_id(warned)}.json"
    saved.write_text(json.dumps({**first, "closed_sites": {"blocks.3": 100}}))
    assert find_equivalent_result(switching, results) is None
    # A run that waited for half strength and then found nothing to switch off acted as "warn"
    # throughout, and as any rule that waits longer; not as the switch at the first check.
    waited = TransferConfig(on_closed_site="exclude", exclude_closed_from=0.5, **settings)
    saved.unlink()
    kept = results / f"{run_id(waited)}.json"
    config = {**first["config"], "on_closed_site": "exclude", "exclude_closed_from": 0.5}
    record = {"closed_sites": {"blocks.3": 100}, "excluded_sites": {}}
    kept.write_text(json.dumps({**first, "config": config, **record}))
    assert find_equivalent_result(warned, results) == kept
    later = TransferConfig(on_closed_site="exclude", exclude_closed_from=0.7, **settings)
    assert find_equivalent_result(later, results) == kept
    assert find_equivalent_result(switching, results) is None
    switched = {"closed_sites": {"blocks.3": 100}, "excluded_sites": {"blocks.3": 2000}}
    kept.write_text(json.dumps({**first, "config": config, **switched}))
    assert find_equivalent_result(warned, results) is None


def test_closed_site_twins_name_a_run_for_each_setting_it_trained_as() -> None:
    """A run is renamed as another closed-site setting's run only where it trained that very
    network: no site closed (every setting), or it waited for a strength and switched nothing
    off ("warn", and any rule that waits at least as long)."""

    def result(
        setting: str, waits: float, closed: dict, excluded: dict | None, last: dict | None = None
    ) -> dict:
        config = TransferConfig(
            target="s-cifar10", phi="default", phi_name="x", on_closed_site=setting,
            exclude_closed_from=waits,
        )  # fmt: skip
        saved = {"phi": "default", "on_closed_site": setting, "exclude_closed_from": waits}
        return {
            "id": run_id(config),
            "method": config.method,
            "config": {**saved, "steps": 10_000, "ramp_fraction": 0.4},
            "closed_sites": closed,
            "excluded_sites": excluded,
            "closed_sites_last": last,
        }

    def methods(r: dict) -> dict[tuple[str, float], str | None]:
        settings = [("warn", 0.0), ("exclude", 0.0), ("exclude", 0.5), ("exclude", 0.75)]
        return {s: twin["method"] if (twin := closed_site_twin(r, *s)) else None for s in settings}

    none_closed = methods(result("warn", 0.0, {}, {}))
    assert none_closed == {
        ("warn", 0.0): None,  # its own setting: no twin
        ("exclude", 0.0): "metaperturb[x,exclude-closed]",
        ("exclude", 0.5): "metaperturb[x,exclude-closed-from0.5]",
        ("exclude", 0.75): "metaperturb[x,exclude-closed-from0.75]",
    }
    waited = methods(result("exclude", 0.5, {"stages.2.2": 200}, {}))
    assert waited == {
        ("warn", 0.0): "metaperturb[x]",
        ("exclude", 0.0): None,  # would have switched the site off at step 200
        ("exclude", 0.5): None,
        ("exclude", 0.75): "metaperturb[x,exclude-closed-from0.75]",
    }
    switched = methods(result("exclude", 0.5, {"stages.2.2": 200}, {"stages.2.2": 2000}))
    assert set(switched.values()) == {None}
    warned = methods(result("warn", 0.0, {"stages.2.2": 200}, {}))
    assert set(warned.values()) == {None}  # closed at step 200: nothing says when it reopened
    # The last check that found it closed says: step 1,900 is strength 0.475 (10,000 steps,
    # ramp over 4,000), so a rule that waits for 0.5 would have switched nothing off either.
    reopened = methods(result("warn", 0.0, {"stages.2.2": 200}, {}, {"stages.2.2": 1900}))
    assert reopened == {
        ("warn", 0.0): None,
        ("exclude", 0.0): None,
        ("exclude", 0.5): "metaperturb[x,exclude-closed-from0.5]",
        ("exclude", 0.75): "metaperturb[x,exclude-closed-from0.75]",
    }
    at_half = methods(result("warn", 0.0, {"stages.2.2": 200}, {}, {"stages.2.2": 2000}))
    assert at_half[("exclude", 0.5)] is None and at_half[("exclude", 0.75)] is not None
    earlier = methods(result("exclude", 0.75, {"stages.2.2": 200}, {}, {"stages.2.2": 1900}))
    assert earlier[("exclude", 0.5)] is not None and earlier[("exclude", 0.0)] is None
    assert trains_as(result("warn", 0.0, {"stages.2.2": 200}, {}), "warn")
    twin = closed_site_twin(result("exclude", 0.5, {"stages.2.2": 200}, {}), "warn")
    assert twin is not None and twin["id"].startswith("s-cifar10__") and "exclude" not in twin["id"]
    assert twin["config"]["on_closed_site"] == "warn" and twin["config"]["exclude_closed_from"] == 0


@needs_mnist
def test_the_ramp_fraction_names_the_run_and_sets_the_strength_schedule(tmp_path: Path) -> None:
    """The annealing ablation: ``ramp_fraction=0`` trains at full strength from the first step;
    the default (0.4, METHOD.md) keeps the method and run id every earlier result has."""
    common = _phi_star_settings(steps=10)
    assert TransferConfig(**common).method == "metaperturb[x]"
    none = TransferConfig(ramp_fraction=0.0, **common)
    assert none.method == "metaperturb[x,ramp0]" and run_id(none) != run_id(
        TransferConfig(**common)
    )
    for fraction, strengths in (
        (0.0, [1.0, 1.0, 1.0]),
        (0.4, [0.0, 0.25, 0.5]),
        (1.0, [0.0, 0.1, 0.2]),
    ):
        run = run_module.TransferRun(TransferConfig(ramp_fraction=fraction, **common), tmp_path)
        assert run.strength is not None
        seen = [run.strength.strength]
        for _ in range(2):
            run.strength.step()
            seen.append(run.strength.strength)
        assert seen == pytest.approx(strengths), fraction


@needs_mnist
def test_update_bn_statistics_that_overflow_are_recorded_as_failed_not_scored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """update_bn refusing non-finite statistics ends that evaluation only: the run keeps its
    other scores, and its update_bn entry says why it has none (ResNet-44 with phi* used to
    record 0.00 from 10,000 NaN predictions)."""

    def overflowing_update_bn(batches: Any, model: torch.nn.Module) -> None:
        raise FloatingPointError("update_bn: the recomputed statistics of 'x' are not finite")

    monkeypatch.setattr(run_module, "update_bn", overflowing_update_bn)
    config = TransferConfig(
        target=tiny_target(), model="conv4", steps=3, batch_size=8, curve_every=0
    )
    result = run_transfer(config, tmp_path, progress=False)
    evaluation = result["evaluation"]
    assert "accuracy" in evaluation["default"] and "accuracy" not in evaluation["update_bn"]
    assert "are not finite" in evaluation["update_bn"]["failed"]


@needs_mnist
def test_the_update_bn_evaluation_leaves_the_saved_network_as_trained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """update_bn runs last and is undone: saved weights keep the statistics training left."""
    from safetensors.torch import load_file

    calls: list[torch.nn.Module] = []

    def marking_update_bn(batches: Any, model: torch.nn.Module) -> None:
        calls.append(model)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d) and module.running_mean is not None:
                module.running_mean.fill_(123.0)

    monkeypatch.setattr(run_module, "update_bn", marking_update_bn)
    config = TransferConfig(
        target=tiny_target(), model="conv4", steps=3, batch_size=8, curve_every=0, save_weights=True
    )
    result = run_transfer(config, tmp_path, progress=False)
    assert len(calls) == 1  # the evaluation went through the (marking) update_bn
    evaluation = result["evaluation"]
    # The marked statistics wreck the network: evaluated with them, it scores otherwise.
    assert abs(evaluation["update_bn"]["nll"] - evaluation["default"]["nll"]) > 1e-3
    saved = load_file(tmp_path / f"{run_id(config)}.safetensors")
    means = [v for k, v in saved.items() if k.endswith("running_mean")]
    assert means and not any(bool((v == 123.0).any()) for v in means)


@needs_mnist
def test_saved_weights_score_the_network_again_and_seed_fine_tuning_with_the_host_only(
    tmp_path: Path,
) -> None:
    """save_weights keeps the whole trained state, phi's site statistics included: loaded into
    a new run's network it predicts exactly what the trained one did. A fine-tuning run started
    from it takes the host's tensors and leaves phi's state behind (its sites start fresh)."""
    from safetensors.torch import load_file

    phi_folder = Perturbation().save_pretrained(tmp_path / "phi")
    common: dict[str, Any] = {
        "target": tiny_target(),
        "model": "conv4",
        "phi": str(phi_folder),
        "phi_name": "fresh",
        "batch_size": 8,
        "curve_every": 0,
        "eval_modes": False,
    }
    config = TransferConfig(steps=4, save_weights=True, **common)
    result = run_transfer(config, tmp_path / "source", progress=False)
    weights = tmp_path / "source" / f"{run_id(config)}.safetensors"
    saved = load_file(weights)
    sites = [k for k in saved if k.startswith("metaperturb.")]
    assert any(k.endswith("running_var") for k in sites)
    assert not all(bool((saved[k] == 1).all()) for k in sites if k.endswith("running_var"))

    again = run_module.TransferRun(config, tmp_path / "again")
    again.model.load_state_dict(saved)
    probabilities = again.predict()
    nll = F.nll_loss(probabilities.clamp_min(1e-12).log(), again.test_data.labels).item()
    assert nll == pytest.approx(result["evaluation"]["default"]["nll"], rel=1e-5)

    tuned = run_module.TransferRun(
        TransferConfig(steps=1, init=str(weights), init_name="source", **common), tmp_path / "ft"
    )
    state = tuned.model.state_dict()
    host = [k for k in saved if not k.startswith("metaperturb.")]
    assert all(torch.equal(state[k], saved[k]) for k in host)
    fresh = run_module.TransferRun(TransferConfig(steps=1, **common), tmp_path / "fresh")
    assert all(torch.equal(state[k], fresh.model.state_dict()[k]) for k in sites)
