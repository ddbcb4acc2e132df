"""Faults injected into meta-training: killed runs and ranks, hung ranks, a full disk, bad data.

Each fault ends in one of two ways: the run continues from its last checkpoint to the same phi
as a run never interrupted (bit for bit: one thread per process everywhere), or it stops with a
message that names the problem and says how to continue. Nothing may hang: every subprocess has
a hard timeout, after which its whole process group is killed. The faults are injected by
tests/fault_driver.py (a wrapper of ``metaperturb train``) or by monkeypatching in-process.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from metaperturb import _atomic
from metaperturb.data import DataError, load_images
from metaperturb.errors import SplitError, TrainingStoppedError
from metaperturb.tasks import make_split
from metaperturb.train import TrainConfig, read_metrics, train

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = DATA / "tiny-imagenet-200-32px"
DRIVER = Path(__file__).with_name("fault_driver.py")
needs_tiny = pytest.mark.skipif(not TINY.is_dir(), reason=f"{TINY} not present")
needs_dist = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")

needs_posix = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals, process groups")

STEPS, EVERY = 6, 2  # checkpoints at steps 2, 4 and 6
SETTINGS: dict[str, Any] = {
    "data": str(TINY), "classes": 4, "max_per_class": 20, "image_size": 16, "num_tasks": 2,
    "batch_size": 8, "steps": STEPS, "log_every": 1, "checkpoint_every": EVERY,
    "device": "cpu", "threads": 1, "progress": False,
}  # fmt: skip
ARGS = [
    "--data", str(TINY), "--classes", "4", "--max-per-class", "20", "--image-size", "16",
    "--num-tasks", "2", "--batch-size", "8", "--steps", str(STEPS), "--log-every", "1",
    "--checkpoint-every", str(EVERY), "--device", "cpu", "--threads", "1", "--no-progress",
]  # fmt: skip
TIMEOUT = 120  # seconds any one subprocess may take before it counts as hung


def _phi(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "phi" / "model.safetensors")


def _assert_same_phi(run: Path, reference: dict[str, torch.Tensor]) -> None:
    phi = _phi(run)
    assert phi.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(phi[name], tensor), name


def _checkpoint_step(run: Path) -> int:
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    return int(state["step"])


def _temporaries(run: Path) -> list[Path]:
    return sorted(run.glob(".*.tmp"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """phi of the run never interrupted, in this process."""
    if not TINY.is_dir():
        pytest.skip(f"{TINY} not present")
    output = tmp_path_factory.mktemp("reference")
    train(TrainConfig(**SETTINGS, output_dir=str(output)))
    return _phi(output)


def _start(command: list[str], fault: str = "") -> subprocess.Popen[str]:
    """A new process group, so that a timeout or a kill takes torchrun's workers too."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "METAPERTURB_FAULT": fault}
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _kill(process: subprocess.Popen[str]) -> None:
    """SIGKILL the process and everything it started (kill -9 of its process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)


def _finish(process: subprocess.Popen[str], timeout: float = TIMEOUT) -> tuple[int, str]:
    """The exit status and stdout + stderr; a process still running after ``timeout`` is hung."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(process)
        pytest.fail(f"{process.args!r} still running after {timeout} s: it hangs")
    return process.returncode, stdout + stderr


def _wait_for(condition: Any, process: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended before {what}: {process.communicate()}")
        if time.monotonic() > deadline:
            _kill(process)
            pytest.fail(f"no {what} after {TIMEOUT} s")
        time.sleep(0.02)


def _logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [record["step"] for record in read_metrics(path)] if path.exists() else []


# -- kill -9 of a single process ------------------------------------------------------------


@needs_tiny
@pytest.mark.slow
@needs_posix
def test_sigkill_mid_checkpoint_write_and_at_a_random_moment_loses_nothing(
    tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    """kill -9 while checkpoint 2 (step 4) is half on disk, then at a random moment of the
    resumed run, then resume to the end: the same phi as the run never killed."""
    run = tmp_path / "run"
    command = [sys.executable, str(DRIVER), *ARGS, "--output-dir", str(run)]

    # 1. Killed with half of the step-4 checkpoint written to its temporary file.
    process = _start(command, fault="hang-in-checkpoint-write:2")
    _wait_for((run / "WRITING").exists, process, "checkpoint write")
    _kill(process)
    (run / "WRITING").unlink()
    half_written = _temporaries(run)
    assert len(half_written) == 1  # the half-written file is there...
    assert _checkpoint_step(run) == EVERY  # ...and checkpoint.pt is still the whole previous one
    assert max(_logged_steps(run)) - _checkpoint_step(run) <= EVERY  # lost: at most EVERY steps

    # 2. Resumed, and killed at a random moment once it is past the checkpoint it resumed from.
    moment = random.Random(0).uniform(0.0, 0.6)
    log = run / "metrics.jsonl"
    killed_log = log.stat().st_ino  # the resumed run replaces the log, cut at its checkpoint

    def resumed_past_checkpoint() -> bool:
        return log.stat().st_ino != killed_log and max(_logged_steps(run), default=0) > EVERY

    process = _start([*command, "--resume"])
    _wait_for(resumed_past_checkpoint, process, "resumed step")
    time.sleep(moment)
    _kill(process)
    assert not half_written[0].exists()  # the resumed run deleted it, never read it
    resumed_from = _checkpoint_step(run)
    assert resumed_from >= EVERY
    logged = _logged_steps(run)
    assert max(logged) - resumed_from <= EVERY, (moment, logged, resumed_from)

    # 3. Resumed to the end (in this process, to save a start-up).
    train(TrainConfig(**SETTINGS, output_dir=str(run), resume=True))
    assert not _temporaries(run)
    assert _logged_steps(run) == list(range(1, STEPS + 1))
    _assert_same_phi(run, reference)


# -- a full disk ----------------------------------------------------------------------------


class _FullDisk(io.BufferedWriter):
    """A file that takes half of what it is given, then fails as a full disk does."""

    def write(self, data: Any) -> int:
        super().write(bytes(data)[: len(data) // 2])
        self.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _full_disk_os(name: str, nth: int) -> types.SimpleNamespace:
    """``os`` for metaperturb._atomic, where the ``nth`` write of ``name`` hits a full disk."""
    fake = types.SimpleNamespace(**vars(os))
    state: dict[str, Any] = {"path": None, "writes": 0}

    def open_(path: Any, *args: Any) -> int:
        state["path"] = Path(path)
        return os.open(path, *args)

    def fdopen(descriptor: int, *args: Any) -> Any:
        if state["path"].name.startswith(f".{name}."):
            state["writes"] += 1
            if state["writes"] == nth:
                return _FullDisk(io.FileIO(descriptor, "wb"))
        return os.fdopen(descriptor, *args)

    fake.open, fake.fdopen = open_, fdopen
    return fake


@needs_tiny
def test_full_disk_mid_checkpoint_keeps_the_previous_one_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: dict[str, torch.Tensor]
) -> None:
    config = TrainConfig(**SETTINGS, output_dir=str(tmp_path))
    with monkeypatch.context() as patch:
        patch.setattr(_atomic, "os", _full_disk_os("checkpoint.pt", nth=2))
        with pytest.raises(TrainingStoppedError) as stopped:
            train(config)
    message = str(stopped.value)
    assert f"stopped at step {2 * EVERY} of {STEPS}" in message
    assert "No space left on device" in message
    assert f"checkpoint of step {EVERY} in {tmp_path} is intact" in message
    assert "--resume" in message
    assert isinstance(stopped.value.__cause__, OSError)
    assert stopped.value.__cause__.errno == errno.ENOSPC
    assert not _temporaries(tmp_path)  # the half-written temporary file was removed
    assert _checkpoint_step(tmp_path) == EVERY  # the previous checkpoint loads
    train(TrainConfig(**SETTINGS, output_dir=str(tmp_path), resume=True))
    _assert_same_phi(tmp_path, reference)


class _Exploit:
    """Unpickling this would create a file: the test checks that it never does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@needs_tiny
def test_damaged_or_foreign_checkpoint_is_refused_not_resumed(tmp_path: Path) -> None:
    """A checkpoint cut short (a copy interrupted) or a pickle carrying code: a clear
    CheckpointError, and nothing unpickled."""
    from metaperturb.train import CheckpointError

    config = TrainConfig(**{**SETTINGS, "steps": EVERY}, output_dir=str(tmp_path))
    train(config)
    resume = TrainConfig(**SETTINGS, output_dir=str(tmp_path), resume=True)
    path = tmp_path / "checkpoint.pt"
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match="is not a readable metaperturb checkpoint"):
        train(resume)
    marker = tmp_path / "unpickled"
    torch.save({"format_version": 1, "step": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="is not a readable metaperturb checkpoint"):
        train(resume)
    assert not marker.exists()


# -- one rank of two under torchrun ---------------------------------------------------------


def _torchrun(run: Path, *options: str) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher += ["--nproc-per-node", "2", *options, str(DRIVER)]
    return [*launcher, *ARGS, "--output-dir", str(run)]


@needs_tiny
@needs_dist
@needs_posix
@pytest.mark.slow
@pytest.mark.distributed
def test_rank_sigkilled_with_max_restarts_resumes_from_the_checkpoint(
    tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    run = tmp_path / "run"
    status, output = _finish(
        _start(_torchrun(run, "--max-restarts", "1"), fault="sigkill-rank:1:4")
    )
    assert status == 0, output[-4000:]
    assert "Signal 9 (SIGKILL)" in output or "exitcode: -9" in output  # the first attempt died
    assert f"resuming {run} from step {EVERY}" in output
    assert _logged_steps(run) == list(range(1, STEPS + 1))
    _assert_same_phi(run, reference)


@needs_tiny
@needs_dist
@needs_posix
@pytest.mark.slow
@pytest.mark.distributed
def test_rank_sigkilled_without_restarts_stops_and_says_how_to_resume(
    tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    run = tmp_path / "run"
    status, output = _finish(_start(_torchrun(run), fault="sigkill-rank:1:4"))
    assert status != 0
    # Rank 0 is stopped by torchrun (SIGTERM) or by the broken connection, and says what to do.
    assert "error: meta-training stopped at step 4 of 6" in output, output[-4000:]
    assert f"the checkpoint of step {EVERY} in {run} is intact" in output
    assert "rerun the same command with --resume" in output
    assert _checkpoint_step(run) == EVERY
    # Doing as it says (here in one process) finishes the same phi.
    train(TrainConfig(**SETTINGS, output_dir=str(run), resume=True))
    _assert_same_phi(run, reference)


@needs_tiny
@needs_posix
@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2], ids=["one-process", "torchrun-2"])
def test_sigterm_checkpoints_the_step_it_is_at_and_resume_gives_the_same_phi(
    tmp_path: Path, reference: dict[str, torch.Tensor], ranks: int
) -> None:
    """SIGTERM to one process (rank 1 of 2 under torchrun) during step 4: every rank ends step 5
    (off the checkpoint schedule), a checkpoint of step 5 is written, the command exits 143 and
    says how to go on; resuming gives the uninterrupted phi. Before, the signal ended the run
    and lost the steps since the last checkpoint (step 4)."""
    if ranks == 2 and not torch.distributed.is_available():
        pytest.skip("no torch.distributed")
    run = tmp_path / "run"
    if ranks == 1:
        command = [sys.executable, str(DRIVER), *ARGS, "--output-dir", str(run)]
    else:
        command = _torchrun(run)
    status, output = _finish(_start(command, fault=f"sigterm-rank:{ranks - 1}:4"))
    assert status != 0
    if ranks == 1:
        assert status == 128 + signal.SIGTERM, output[-4000:]
    message = f"meta-training stopped at step 5 of {STEPS} as asked; the checkpoint of step 5"
    assert output.count(message) == ranks, output[-4000:]  # every rank stopped at that step
    assert _checkpoint_step(run) == 5 and not _temporaries(run)
    assert _logged_steps(run) == [1, 2, 3, 4, 5]
    train(TrainConfig(**SETTINGS, output_dir=str(run), resume=True))
    _assert_same_phi(run, reference)
    assert _logged_steps(run) == list(range(1, STEPS + 1))


@needs_tiny
@needs_dist
@needs_posix
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case", ["run-exists", "resume-without-checkpoint"])
def test_max_restarts_repeat_a_refusal_instead_of_training(tmp_path: Path, case: str) -> None:
    """A refusal at set-up stays a refusal on every restart. Before, the restart counted as a
    resume: it silently continued the run the folder already held (no --resume given), or
    started a new run in a folder that --resume had named by mistake."""
    run = tmp_path / "run"
    if case == "run-exists":  # one process: the single worker reaches the agent's store too
        train(TrainConfig(**{**SETTINGS, "steps": EVERY}, output_dir=str(run)))
        command = _torchrun(run, "--max-restarts", "1")
        command[command.index("--nproc-per-node") + 1] = "1"
        refusal = f"{run} already holds a run (checkpoint.pt). Pass --resume"
    else:  # two processes: the ranks receive rank 0's decision
        command = [*_torchrun(run, "--max-restarts", "1"), "--resume"]
        refusal = f"--resume: no checkpoint in {run} to continue from"
    status, output = _finish(_start(command))
    assert status != 0, output[-4000:]
    assert output.count(refusal) >= 2, output[-4000:]  # the first attempt and the restart
    if case == "run-exists":
        assert _checkpoint_step(run) == EVERY and _logged_steps(run) == [1, 2]
    else:
        assert not (run / "checkpoint.pt").exists()


@needs_tiny
@needs_dist
@needs_posix
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("fault", ["sigterm-rank:1:4", "nan-loss:3"], ids=["stop", "diverge"])
def test_max_restarts_keep_a_stop_or_a_divergence_final(tmp_path: Path, fault: str) -> None:
    """A stop that was asked for, or a divergence, ends the launch: the restart repeats the
    error without training. Before, the restart resumed the run, undoing the stop, or trained
    the same steps again into the same divergence."""
    run = tmp_path / "run"
    status, output = _finish(_start(_torchrun(run, "--max-restarts", "1"), fault=fault))
    assert status != 0, output[-4000:]
    assert "torchrun restarted the workers after that; they did not train again" in output
    stopped = 5 if fault.startswith("sigterm") else EVERY
    assert _checkpoint_step(run) == stopped and _logged_steps(run) == list(range(1, stopped + 1))
    assert output.count("did not train again") == 2 and f"resuming {run}" not in output
    if fault.startswith("nan"):  # both ranks, in the first attempt and again in the restart
        assert output.count("diverged at step 3 of 6") == 4
    assert not (run / "phi").exists()


@needs_tiny
@needs_dist
def test_launch_notes_are_per_folder_and_per_worker_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rules of the notes, in this process with a store like torchrun's agent's.

    A note counts only for its output folder and only when another worker process left it: a
    script that calls ``train`` again after a divergence is not refused. A divergence is final
    for workers restarted after a failure (a higher restart count), not for workers restarted
    for a membership change (the same count), which resume. A checkpoint that no worker of this
    launch set up is still refused without --resume."""
    from metaperturb.errors import RunExistsError
    from metaperturb.train import loop
    from metaperturb.train.learner import TaskLearner

    server = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    outside = tmp_path / "outside"  # a run made before the launch: no note
    train(TrainConfig(**{**SETTINGS, "steps": EVERY}, output_dir=str(outside)))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")

    def worker(name: str, attempt: int) -> None:
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(attempt))
        monkeypatch.setattr(loop, "_this_worker", lambda: {"worker": name, "attempt": attempt})

    real_step = TaskLearner.step

    def nan_at_step_3(self: TaskLearner, index: int, grads: list[torch.Tensor]) -> torch.Tensor:
        losses = real_step(self, index, grads)
        return losses * float("nan") if index == 2 else losses

    def run(folder: Path, **changes: Any) -> None:
        train(TrainConfig(**{**SETTINGS, **changes}, output_dir=str(folder)))

    first, second = tmp_path / "first", tmp_path / "second"
    worker("w1", 0)
    monkeypatch.setattr(TaskLearner, "step", nan_at_step_3)
    for folder in (first, second):
        with pytest.raises(TrainingStoppedError, match="diverged at step 3"):
            run(folder)
    monkeypatch.setattr(TaskLearner, "step", real_step)
    # The same process tries again: its own notes neither stop it nor stand for --resume.
    with pytest.raises(RunExistsError, match="already holds a run"):
        run(first)
    run(first, resume=True)
    assert _checkpoint_step(first) == STEPS

    worker("w2", 1)  # restarted after the failure: the divergence is final
    with pytest.raises(TrainingStoppedError, match="diverged at step 3.*did not train again"):
        run(second)
    assert _checkpoint_step(second) == EVERY
    worker("w3", 0)  # restarted for a membership change: it resumes without --resume
    run(second)
    assert _checkpoint_step(second) == STEPS and _logged_steps(second) == list(range(1, 7))

    worker("w4", 1)  # no worker of this launch set the outside run up
    with pytest.raises(RunExistsError, match="already holds a run"):
        run(outside)
    assert _checkpoint_step(outside) == EVERY


def _as_forked_rank(
    rank: int, port: int, run: Path, results: Any, fault: Any, dist_timeout: float
) -> None:
    """Rank ``rank`` of 2 in a forked process: install ``fault(rank)``, train, and put the
    outcome (or the error's type and message) on ``results``."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )  # fmt: skip
    fault(rank)
    try:
        train(TrainConfig(**SETTINGS, output_dir=str(run), dist_timeout=dist_timeout))
        results.put((rank, "finished"))
    except Exception as error:  # noqa: BLE001 - sent to the test, which checks it
        results.put((rank, f"{type(error).__name__}: {error}"))


def _two_forked_ranks(run: Path, fault: Any, dist_timeout: float, wait_for: int) -> list[Any]:
    """The first ``wait_for`` (rank, outcome) pairs of two ranks forked from this process (no
    torchrun, which saves their start-up); a test that gets fewer within TIMEOUT fails as a
    hang."""
    import multiprocessing
    import queue
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    ranks = [
        context.Process(
            target=_as_forked_rank, args=(rank, port, run, results, fault, dist_timeout)
        )
        for rank in range(2)
    ]
    for process in ranks:
        process.start()
    try:
        return [results.get(timeout=TIMEOUT) for _ in range(wait_for)]
    except queue.Empty:
        pytest.fail(f"no rank finished or failed within {TIMEOUT} s: it hangs")
    finally:
        for process in ranks:
            process.kill()
            process.join(timeout=30)


def _full_disk_at_rank_0s_second_checkpoint(rank: int) -> None:
    from metaperturb.train import checkpoint

    real = checkpoint.save
    writes = 0

    def save(path: Path, payload: dict[str, Any]) -> Path:
        nonlocal writes
        writes += 1
        if rank == 0 and writes == 2:
            raise OSError(28, "No space left on device")
        return real(path, payload)

    checkpoint.save = save  # type: ignore[assignment]


@needs_tiny
@needs_dist
@needs_posix
@pytest.mark.distributed
def test_a_failure_on_rank_0_alone_stops_every_rank_at_the_last_good_checkpoint(
    tmp_path: Path,
) -> None:
    """Rank 0's checkpoint write of step 4 fails. Every rank stops at once and names the
    checkpoint of step 2. Before, rank 1 went on to the next collective and waited there, and
    named the checkpoint of step 4, which was never written."""
    fault = _full_disk_at_rank_0s_second_checkpoint
    outcomes = dict(_two_forked_ranks(tmp_path, fault, dist_timeout=TIMEOUT, wait_for=2))
    for rank, outcome in outcomes.items():
        assert outcome.startswith("TrainingStoppedError"), (rank, outcome)
        assert f"stopped at step 4 of {STEPS}" in outcome and "No space left" in outcome
        assert f"the checkpoint of step {EVERY} in {tmp_path}" in outcome, (rank, outcome)
    assert "rank 0 failed (OSError: [Errno 28] No space left on device)" in outcomes[1]
    assert _checkpoint_step(tmp_path) == EVERY


def _rank_1_hangs_at_step_4(rank: int) -> None:
    from metaperturb.train.distributed import Collective

    real = Collective.all_reduce_sum_
    steps = 0

    def all_reduce(self: Collective, flat: torch.Tensor) -> torch.Tensor:
        nonlocal steps
        steps += 1
        if rank == 1 and steps == 4:
            time.sleep(TIMEOUT)
        return real(self, flat)

    Collective.all_reduce_sum_ = all_reduce  # type: ignore[method-assign]


@needs_tiny
@needs_dist
@needs_posix
@pytest.mark.distributed
def test_hung_rank_times_out_instead_of_hanging(tmp_path: Path) -> None:
    """Rank 1 stops answering at step 4; rank 0 gives up after dist_timeout (3 s), not never."""
    started = time.monotonic()
    [(rank, outcome)] = _two_forked_ranks(
        tmp_path, _rank_1_hangs_at_step_4, dist_timeout=3, wait_for=1
    )
    assert rank == 0 and outcome.startswith("TrainingStoppedError"), outcome
    assert "Timed out waiting 3000ms" in outcome
    assert f"stopped at step 4 of {STEPS}" in outcome and "--resume" in outcome
    assert time.monotonic() - started < 60
    assert _checkpoint_step(tmp_path) == EVERY


# -- data -----------------------------------------------------------------------------------


def _png(seed: int, size: int = 12) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=generator)
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def _parquet(
    folder: Path,
    labels: list[int],
    bad: dict[int, bytes],
    classes: int = 4,
    names: list[str] | None = None,
) -> Path:
    """``folder/train.parquet``: a PNG per label (rows in ``bad`` get those bytes instead)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [
        {"bytes": bad.get(row, _png(row)), "path": f"img-{row}.png"} for row in range(len(labels))
    ]
    names = names or [f"class-{k}" for k in range(classes)]
    features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
    table = pa.table({"image": images, "label": labels}).replace_schema_metadata(
        {"huggingface": json.dumps({"info": {"features": features}})}
    )
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "train.parquet")
    return folder


LABELS = [row % 4 for row in range(16)]  # 4 classes x 4 images


@pytest.mark.parametrize(
    "bad",
    [b"this is not an image", _png(99)[: len(_png(99)) // 2]],
    ids=["not an image", "truncated png"],
)
def test_unreadable_image_is_named_then_fatal_or_skipped(tmp_path: Path, bad: bytes) -> None:
    folder = _parquet(tmp_path, LABELS, {5: bad})
    with pytest.raises(DataError, match=r"image of row 5 \(img-5\.png\) cannot be decoded") as info:
        load_images(folder, image_size=8)
    assert "on_bad_image='skip'" in str(info.value)
    data = load_images(folder, image_size=8, on_bad_image="skip")
    assert data.skipped_rows == [5] and len(data) == 15
    assert torch.bincount(data.labels).tolist() == [4, 3, 4, 4]
    clean = load_images(_parquet(tmp_path / "clean", LABELS, {}), image_size=8)
    keep = [row for row in range(16) if row != 5]
    assert torch.equal(data.images, clean.images[keep])  # the others, untouched and in order
    assert torch.equal(data.labels, clean.labels[keep])
    with pytest.raises(DataError, match="on_bad_image must be"):
        load_images(folder, on_bad_image="ignore")  # type: ignore[arg-type]


def test_a_class_with_no_readable_image_left_is_an_error(tmp_path: Path) -> None:
    folder = _parquet(tmp_path, LABELS, dict.fromkeys((1, 5, 9, 13), b"junk"))
    with pytest.raises(DataError, match=r"no readable image left in classes \['class-1'\]"):
        load_images(folder, image_size=8, on_bad_image="skip")


def test_train_cli_reports_or_skips_a_bad_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from metaperturb.cli import main

    folder = _parquet(tmp_path / "data", LABELS, {6: b"junk"})
    argv = ["train", "--data", str(folder), "--image-size", "8", "--num-tasks", "2"]
    argv += ["--batch-size", "2", "--steps", "1", "--no-progress", "--threads", "1"]
    argv += ["--device", "cpu", "--padding", "0"]
    assert main([*argv, "--output-dir", str(tmp_path / "a")]) == 1
    error = capsys.readouterr().err
    assert "row 6 (img-6.png) cannot be decoded" in error and "--on-bad-image skip" in error
    assert not (tmp_path / "a" / "checkpoint.pt").exists()
    run = tmp_path / "b"
    assert main([*argv, "--on-bad-image", "skip", "--output-dir", str(run)]) == 0
    assert (run / "phi" / "model.safetensors").is_file()
    assert json.loads((run / "split.json").read_text())["num_images"] == 15
    assert json.loads((run / "train_config.json").read_text())["on_bad_image"] == "skip"


def test_too_few_images_for_the_split_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from metaperturb.cli import main

    folder = _parquet(tmp_path / "data", [0, 0, 1, 1, 2, 3, 3, 3], {})
    argv = ["train", "--data", str(folder), "--image-size", "8", "--num-tasks", "2"]
    argv += ["--steps", "1", "--no-progress", "--device", "cpu", "--output-dir", str(tmp_path)]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert "needs at least 2 images of each class, and 1 classes have fewer" in error
    assert "{2: 1}" in error and "Use more images per class" in error
    with pytest.raises(SplitError, match="need 4 classes; the dataset has 2"):
        make_split([0, 0, 1, 1], num_tasks=2, group_size=4)


def test_labels_out_of_range_are_clear_errors(tmp_path: Path) -> None:
    folder = _parquet(tmp_path / "beyond", [0, 1, 2, 3, 7, 1], {})
    with pytest.raises(
        DataError, match=r"1 labels beyond its 4 class names \(0\.\.3\), first at rows \[4\]"
    ):
        load_images(folder, image_size=8)
    folder = _parquet(tmp_path / "negative", [0, -1, 1, 1], {})
    with pytest.raises(DataError, match=r"1 negative labels .* first at rows \[1\]"):
        load_images(folder, image_size=8)
    # make_split used to map -1 to the last class of a task without a word.
    with pytest.raises(SplitError, match=r"negative labels, first rows \[2\]"):
        make_split([0, 0, -1, 1, 1], num_tasks=2)
    with pytest.raises(
        SplitError, match=r"beyond the 2 class names \(0\.\.1\), first rows \[4, 5\]"
    ):
        make_split([0, 0, 1, 1, 2, 2], num_tasks=2, class_names=["a", "b"])


@pytest.mark.parametrize("change", ["class names", "labels"])
def test_resume_refuses_other_data_with_as_many_rows(tmp_path: Path, change: str) -> None:
    """The run's --data now holds other images (re-exported, replaced) with as many rows.
    Before, a resume compared only the number of rows, and went on training on tasks the split
    no longer described."""
    settings = {"image_size": 8, "num_tasks": 2, "group_size": 2, "batch_size": 4, "steps": 2}
    settings |= {"device": "cpu", "threads": 1, "progress": False}
    data, run = tmp_path / "data", tmp_path / "run"
    _parquet(data, LABELS, {})
    original = (data / "train.parquet").read_bytes()
    train(TrainConfig(data=str(data), output_dir=str(run), **settings))
    if change == "class names":
        _parquet(data, LABELS, {}, names=["ant", "bee", "cat", "dog"])
        expected = r"names the classes \['class-0', .*\(4\), the data now names them \['ant'"
    else:
        _parquet(data, [(label + 1) % 4 for label in LABELS], {})
        expected = r"does not fit the data's labels \(invalid task split: task 0 has rows outside"
    resume = TrainConfig(
        data=str(data), output_dir=str(run), resume=True, **settings | {"steps": 4}
    )
    from metaperturb.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=expected) as refused:
        train(resume)
    assert "Resume with the run's original --data" in str(refused.value)
    assert _checkpoint_step(run) == 2
    (data / "train.parquet").write_bytes(original)  # the original data resumes as before
    train(resume)
    assert _checkpoint_step(run) == 4
