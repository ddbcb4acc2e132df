"""Saving and loading phi: local folders and files, strict checks, the Hub (a local stand-in)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.repocard import metadata_load
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from hub_server import HubStandIn
from metaperturb import hub
from metaperturb.errors import DefaultPhiUnavailableError, PhiFormatError, PhiNotFoundError
from metaperturb.hub import (
    default_phi_path,
    load_default_phi,
    load_phi,
    push_to_hub,
    save_pretrained,
)
from metaperturb.phi import Perturbation, PerturbationConfig

REPO = "metaperturb-tests/phi"
KEYS = [
    "noise_in.self_weight",
    "noise_in.mean_weight",
    "noise_out.self_weight",
    "noise_out.mean_weight",
    "scale_kernels",
    "scale_weight",
]


def make_phi(seed: int = 0, **metadata: str) -> Perturbation:
    torch.manual_seed(seed)
    config = PerturbationConfig(channel_norm=64.0, spatial_norm=32.0, metadata=dict(metadata))
    return Perturbation(config)


def assert_same_phi(a: Perturbation, b: Perturbation) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sb[name].dtype == torch.float32
        assert torch.equal(sa[name].float(), sb[name]), name
    assert a.config == b.config


def folder_bytes(phi: Perturbation, tmp_path: Path, name: str = "saved") -> dict[str, bytes]:
    """The files save_pretrained writes for ``phi``, as a Hub revision's content."""
    folder = save_pretrained(phi, tmp_path / name, repo_id=REPO)
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def state_of(phi: Perturbation) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in phi.state_dict().items()}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], **metadata: str) -> Path:
    path.write_bytes(safetensors_save(tensors, metadata=metadata or None))
    return path


@pytest.fixture(autouse=True)
def _isolated_hub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the user's Hub cache or token, or depends on HF_HUB_OFFLINE in the shell."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads HF_HUB_OFFLINE once at import; the tests set the constant it checks.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def server() -> Iterator[HubStandIn]:
    with HubStandIn() as stand_in:
        yield stand_in


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "hub-cache"


def hub_load(server_url: str, cache: Path, repo: str = REPO, **kwargs: Any) -> Perturbation:
    # token=False: never send a real credential to the stand-in.
    return load_phi(repo, endpoint=server_url, cache_dir=cache, token=False, **kwargs)


class _NoSleep:
    """``time`` without waiting: huggingface_hub retries a dead server for ~25 s otherwise."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        pass


@pytest.fixture
def no_retry_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import file_download
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http, "time", _NoSleep(), raising=False)
    monkeypatch.setattr(file_download, "time", _NoSleep(), raising=False)


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ---------------------------------------------------------------------------------------------
# Local folders and files
# ---------------------------------------------------------------------------------------------


def test_folder_round_trip(tmp_path: Path) -> None:
    phi = make_phi(source_dataset="tiny-imagenet", source_architecture="resnet20")
    folder = save_pretrained(phi, tmp_path / "phi")
    assert folder == tmp_path / "phi"
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    loaded = load_phi(folder)
    assert_same_phi(phi, loaded)
    assert loaded.config.metadata == {
        "source_dataset": "tiny-imagenet",
        "source_architecture": "resnet20",
    }


def test_fingerprint_follows_the_numbers_not_the_file(tmp_path: Path) -> None:
    phi = make_phi(source_dataset="tiny-imagenet")
    loaded = load_phi(save_pretrained(phi, tmp_path / "phi"))
    loaded.config.metadata["source_dataset"] = "elsewhere"
    assert loaded.fingerprint() == phi.fingerprint() and len(phi.fingerprint()) == 64
    with torch.no_grad():
        loaded.scale_weight[0, 3] += 1e-6
    assert loaded.fingerprint() != phi.fingerprint()


def test_saved_file_layout(tmp_path: Path) -> None:
    phi = make_phi(source_dataset="tiny-imagenet").double()
    folder = save_pretrained(phi, tmp_path / "phi")
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        assert sorted(handle.keys()) == sorted(KEYS)
        assert all(handle.get_tensor(k).dtype == torch.float32 for k in KEYS)
        metadata = handle.metadata()
    assert metadata["format"] == "pt"
    assert metadata["metaperturb_format_version"] == "1"
    assert metadata["source_dataset"] == "tiny-imagenet"
    assert metadata["source_architecture"] == "unknown"
    config = json.loads((folder / "config.json").read_text())
    assert config["format_version"] == 1
    assert config["library_name"] == "metaperturb"
    assert config["channel_norm"] == 64.0
    assert sum(t.numel() for t in load_phi(folder).state_dict().values()) == 82


def test_unknown_provenance_is_not_invented(tmp_path: Path) -> None:
    folder = save_pretrained(make_phi(), tmp_path / "phi")
    assert load_phi(folder).config.metadata == {}
    assert load_phi(folder / "model.safetensors").config.metadata == {}


def test_single_file_keeps_config_from_header(tmp_path: Path) -> None:
    phi = make_phi(source_dataset="tiny-imagenet")
    folder = save_pretrained(phi, tmp_path / "phi")
    lone = tmp_path / "elsewhere" / "phi-star.safetensors"
    lone.parent.mkdir()
    shutil.copy(folder / "model.safetensors", lone)
    assert_same_phi(phi, load_phi(lone))
    assert_same_phi(phi, load_phi(str(lone)))


def test_plain_safetensors_file_gets_default_config(tmp_path: Path) -> None:
    phi = make_phi()
    path = write_safetensors(tmp_path / "plain.safetensors", state_of(phi), source_dataset="x")
    loaded = load_phi(path)
    assert loaded.config == PerturbationConfig(metadata={"source_dataset": "x"})
    for name, tensor in state_of(phi).items():
        assert torch.equal(loaded.state_dict()[name], tensor)


def test_config_json_wins_over_header(tmp_path: Path) -> None:
    folder = save_pretrained(make_phi(), tmp_path / "phi")
    config = json.loads((folder / "config.json").read_text())
    config["clip"] = 7.0
    (folder / "config.json").write_text(json.dumps(config))
    assert load_phi(folder).config.clip == 7.0


def test_loading_does_not_move_the_global_rng(tmp_path: Path) -> None:
    folder = save_pretrained(make_phi(), tmp_path / "phi")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_phi(folder)
    assert torch.equal(torch.rand(3), expected)


def test_local_paths_ignore_hub_options_with_a_warning(tmp_path: Path) -> None:
    folder = save_pretrained(make_phi(), tmp_path / "phi")
    with pytest.warns(UserWarning, match="revision"):
        load_phi(folder, revision="v1")


def test_a_diverged_phi_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """Loading refuses non-finite weights, so saving (or pushing) them would publish a phi
    nobody can load: refuse it there, and leave the folder's earlier phi as it was."""
    folder = save_pretrained(make_phi(), tmp_path / "phi")
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    phi = make_phi()
    with torch.no_grad():
        phi.scale_weight[0, 3] = float("nan")
    with pytest.raises(ValueError, match="scale_weight hold NaN or infinite values"):
        save_pretrained(phi, folder)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before


def test_model_card_has_hub_metadata(tmp_path: Path) -> None:
    phi = make_phi(source_dataset="tiny-imagenet", source_architecture="resnet20")
    folder = save_pretrained(phi, tmp_path / "phi", repo_id=REPO, provenance="Meta-trained here.")
    card = metadata_load(folder / "README.md")
    assert card is not None
    assert card["library_name"] == "metaperturb"
    assert card["license"] == "mit"
    assert card["tags"] == ["metaperturb", "regularization", "pytorch", "image-classification"]
    assert card["datasets"] == ["tiny-imagenet"]
    text = (folder / "README.md").read_text()
    assert f'metaperturb.wrap(model, phi="{REPO}")' in text
    assert "Meta-trained here." in text
    assert "resnet20" in text


def test_model_card_without_known_dataset(tmp_path: Path) -> None:
    folder = save_pretrained(make_phi(), tmp_path / "phi", license="other")
    card = metadata_load(folder / "README.md")
    assert card is not None
    assert "datasets" not in card
    assert card["license"] == "other"


def test_metadata_must_be_strings(tmp_path: Path) -> None:
    phi = make_phi()
    phi.config.metadata["steps"] = 750  # type: ignore[assignment]
    with pytest.raises(TypeError, match="steps"):
        save_pretrained(phi, tmp_path / "phi")
    assert not (tmp_path / "phi").exists()


# ---------------------------------------------------------------------------------------------
# Strictness
# ---------------------------------------------------------------------------------------------


def corrupt_state(kind: str) -> dict[str, torch.Tensor]:
    state = state_of(make_phi())
    if kind == "wrong shape":
        state["scale_weight"] = torch.zeros(1, 8)
    elif kind == "missing tensor":
        del state["scale_kernels"]
    elif kind == "extra tensor":
        state["running_mean"] = torch.zeros(4)
    elif kind == "int dtype":
        state["scale_kernels"] = torch.zeros(4, 1, 3, 3, dtype=torch.int32)
    elif kind == "nan":
        state["noise_out.mean_weight"][0, 0, 1, 1] = float("nan")
    elif kind == "inf":
        state["noise_in.self_weight"][0, 0, 0, 0] = float("inf")
    return state


@pytest.mark.parametrize(
    ("kind", "names"),
    [
        ("wrong shape", ["scale_weight", "(1, 8)", "(1, 10)"]),
        ("missing tensor", ["missing", "scale_kernels"]),
        ("extra tensor", ["unexpected", "running_mean"]),
        ("int dtype", ["scale_kernels", "int32", "float32"]),
        ("nan", ["noise_out.mean_weight", "NaN"]),
        ("inf", ["noise_in.self_weight", "infinite"]),
    ],
)
def test_bad_tensors_are_named(tmp_path: Path, kind: str, names: list[str]) -> None:
    path = write_safetensors(tmp_path / "bad.safetensors", corrupt_state(kind))
    with pytest.raises(PhiFormatError) as caught:
        load_phi(path)
    message = str(caught.value)
    for name in names:
        assert name in message
    assert "save_pretrained" in message


def test_all_problems_reported_together(tmp_path: Path) -> None:
    state = corrupt_state("missing tensor")
    state["extra"] = torch.zeros(1)
    state["scale_weight"] = torch.zeros(2, 10)
    path = write_safetensors(tmp_path / "bad.safetensors", state)
    with pytest.raises(PhiFormatError) as caught:
        load_phi(path)
    message = str(caught.value)
    assert "scale_kernels" in message and "'extra'" in message and "(2, 10)" in message


def test_half_precision_is_accepted_as_fp32(tmp_path: Path) -> None:
    state = {k: v.half() for k, v in state_of(make_phi()).items()}
    loaded = load_phi(write_safetensors(tmp_path / "half.safetensors", state))
    for name, tensor in state.items():
        assert loaded.state_dict()[name].dtype == torch.float32
        assert torch.equal(loaded.state_dict()[name], tensor.float())


def _valid_bytes() -> bytes:
    return safetensors_save(state_of(make_phi()))


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        ("truncated", _valid_bytes()[:-40]),
        ("cut inside the header", _valid_bytes()[:50]),
        ("shorter than 8 bytes", b"\x01\x02"),
        ("random bytes", bytes(range(256)) * 4),
        ("huge header", struct.pack("<Q", 2**62) + b"{}"),
        ("header not json", struct.pack("<Q", 4) + b"\xff\xfe{]"),
        ("header not an object", struct.pack("<Q", 2) + b"[]"),
        ("empty", b""),
    ],
)
def test_not_safetensors(tmp_path: Path, kind: str, data: bytes) -> None:
    path = tmp_path / "phi.safetensors"
    path.write_bytes(data)
    with pytest.raises(PhiFormatError, match="not a valid safetensors file"):
        load_phi(path)


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy-pickle"])
def test_pickle_renamed_to_safetensors_is_never_unpickled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zipped: bool
) -> None:
    path = tmp_path / "model.safetensors"
    torch.save(state_of(make_phi()), path, _use_new_zipfile_serialization=zipped)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("metaperturb.hub must never unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    with pytest.raises(PhiFormatError) as caught:
        load_phi(path)
    message = str(caught.value)
    assert "not a valid safetensors file" in message
    assert "never unpickles" in message
    assert "metaperturb.convert" in message


def test_oversized_file_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    with path.open("wb") as stream:
        stream.truncate(17 * 1024 * 1024)  # sparse: costs no disk
    with pytest.raises(PhiFormatError, match="82 numbers"):
        load_phi(path)


def test_newer_format_in_header(tmp_path: Path) -> None:
    path = write_safetensors(
        tmp_path / "new.safetensors", state_of(make_phi()), metaperturb_format_version="2"
    )
    with pytest.raises(PhiFormatError, match="upgrade metaperturb"):
        load_phi(path)


def test_newer_format_in_config(tmp_path: Path) -> None:
    folder = save_pretrained(make_phi(), tmp_path / "phi")
    config = json.loads((folder / "config.json").read_text())
    config["format_version"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(PhiFormatError, match="newer metaperturb.*upgrade"):
        load_phi(folder)


def test_unknown_config_key(tmp_path: Path) -> None:
    folder = save_pretrained(make_phi(), tmp_path / "phi")
    config = json.loads((folder / "config.json").read_text())
    config["future_knob"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(PhiFormatError, match="future_knob.*upgrade"):
        load_phi(folder)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"clip": -1}', "clip"),
        ('{"metadata": [1]}', "metadata"),
        ('{"metadata": {"steps": 750}}', "metadata"),
    ],
)
def test_bad_config_json(tmp_path: Path, text: str, match: str) -> None:
    folder = save_pretrained(make_phi(), tmp_path / "phi")
    (folder / "config.json").write_text(text)
    with pytest.raises(PhiFormatError, match=match):
        load_phi(folder)


def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(PhiNotFoundError, match="no such file"):
        load_phi(tmp_path / "nowhere")
    with pytest.raises(PhiNotFoundError, match="no such file"):
        load_phi("./not/here")
    with pytest.raises(PhiNotFoundError, match="no such file"):
        load_phi(str(tmp_path / "phi.safetensors"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "perturb_750.pth").write_bytes(b"x")
    with pytest.raises(PhiNotFoundError, match="model.safetensors.*metaperturb.convert"):
        load_phi(empty)
    # A PhiNotFoundError is also the builtin a caller would catch.
    with pytest.raises(FileNotFoundError):
        load_phi(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def _fail_on_call(monkeypatch: pytest.MonkeyPatch, name: str, call: int) -> None:
    real = getattr(os, name)
    calls = {"n": 0}

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == call:
            raise OSError(28, "No space left on device (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, failing)


@pytest.mark.parametrize(("name", "call"), [("fsync", 1), ("fsync", 3), ("replace", 1)])
def test_failed_save_keeps_previous_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, call: int
) -> None:
    folder = save_pretrained(make_phi(0), tmp_path / "phi")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with monkeypatch.context() as patch:
        _fail_on_call(patch, name, call)
        with pytest.raises(OSError, match="simulated"):
            save_pretrained(make_phi(1), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert_same_phi(make_phi(0), load_phi(folder))


def test_failed_save_leaves_no_new_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_on_call(monkeypatch, "fsync", 2)
    with pytest.raises(OSError, match="simulated"):
        save_pretrained(make_phi(), tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_save_overwrites(tmp_path: Path) -> None:
    save_pretrained(make_phi(0), tmp_path / "phi")
    save_pretrained(make_phi(1), tmp_path / "phi")
    assert_same_phi(make_phi(1), load_phi(tmp_path / "phi"))
    assert sorted(p.name for p in (tmp_path / "phi").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]


# ---------------------------------------------------------------------------------------------
# The bundled phi*
# ---------------------------------------------------------------------------------------------


def test_default_phi_path_is_the_weights_folder() -> None:
    path = default_phi_path()
    assert path.name == "phi-star"
    assert path.parent.name == "weights"


def test_load_default_phi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "default_phi_path", lambda: tmp_path / "weights" / "phi-star")
    with pytest.raises(DefaultPhiUnavailableError, match="does not ship a meta-trained phi"):
        load_default_phi()
    with pytest.raises(PhiNotFoundError):  # the parent class a caller may catch instead
        load_default_phi()
    phi = make_phi(source_dataset="tiny-imagenet")
    save_pretrained(phi, tmp_path / "weights" / "phi-star")
    assert_same_phi(phi, load_default_phi())


def test_bundled_phi_is_either_absent_or_valid() -> None:
    folder = default_phi_path()
    if (folder / "model.safetensors").exists():
        assert (folder / "README.md").is_file(), "phi* must ship with its model card"
        load_default_phi()
    else:
        with pytest.raises(DefaultPhiUnavailableError, match="phi="):
            load_default_phi()


# ---------------------------------------------------------------------------------------------
# The Hub (against the local stand-in)
# ---------------------------------------------------------------------------------------------


def test_hub_first_download_then_cache(server: HubStandIn, cache: Path, tmp_path: Path) -> None:
    phi = make_phi(source_dataset="tiny-imagenet")
    server.add(REPO, "main", folder_bytes(phi, tmp_path))
    assert_same_phi(phi, hub_load(server.url, cache))
    assert server.count("GET", "model.safetensors") == 1
    assert server.count("GET", "config.json") == 1
    # Online again: only metadata requests, the files come from the cache.
    assert_same_phi(phi, hub_load(server.url, cache))
    assert server.count("GET") == 2
    assert server.count("HEAD", "model.safetensors") == 2


def test_hub_cache_hit_with_server_stopped(
    server: HubStandIn, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    phi = make_phi(1)
    server.add(REPO, "main", folder_bytes(phi, tmp_path))
    hub_load(server.url, cache)
    seen = len(server.requests)
    server.stop()
    assert_same_phi(phi, hub_load(server.url, cache, local_files_only=True))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    assert_same_phi(phi, hub_load(server.url, cache))
    assert len(server.requests) == seen


@pytest.mark.slow
def test_hub_offline_env_in_a_fresh_process(
    server: HubStandIn, cache: Path, tmp_path: Path
) -> None:
    """HF_HUB_OFFLINE=1 as a user sets it: read by huggingface_hub at import."""
    phi = make_phi(2)
    server.add(REPO, "main", folder_bytes(phi, tmp_path))
    hub_load(server.url, cache)
    server.stop()
    script = (
        "import sys, torch\n"
        "from metaperturb.hub import load_phi\n"
        f"phi = load_phi({REPO!r}, cache_dir={str(cache)!r}, endpoint={server.url!r})\n"
        "torch.save(phi.state_dict(), sys.argv[1])\n"
    )
    out = tmp_path / "state.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "-c", script, str(out)], check=True, env=env, cwd=tmp_path, timeout=120
    )
    loaded = torch.load(out, weights_only=True)
    for name, tensor in state_of(phi).items():
        assert torch.equal(loaded[name], tensor)


def test_hub_pinned_revision(server: HubStandIn, cache: Path, tmp_path: Path) -> None:
    old, new = make_phi(10), make_phi(11)
    commit = server.add(REPO, "v1", folder_bytes(old, tmp_path, "old"))
    server.add(REPO, "main", folder_bytes(new, tmp_path, "new"))
    assert_same_phi(new, hub_load(server.url, cache))
    assert_same_phi(old, hub_load(server.url, cache, revision="v1"))
    assert_same_phi(old, hub_load(server.url, cache, revision=commit))
    server.stop()  # a commit sha already in the cache needs no request at all
    assert_same_phi(old, hub_load(server.url, cache, revision=commit))


def test_weights_and_config_come_from_one_commit(
    server: HubStandIn, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push between the two downloads must not pair the old weights with the new config
    (the config wins over the weights' header, so the mismatch would pass silently)."""
    old, new = make_phi(10), make_phi(11, source_dataset="elsewhere")
    new.config = PerturbationConfig(channel_norm=8.0, spatial_norm=4.0, metadata={})
    server.add(REPO, "main", folder_bytes(old, tmp_path, "old"))
    download = hub.hf_hub_download

    def push_after_the_weights(repo_id: str, filename: str, **kwargs: Any) -> str:
        path = download(repo_id, filename, **kwargs)
        if filename == "model.safetensors":
            server.add(REPO, "main", folder_bytes(new, tmp_path, "new"))
        return path

    monkeypatch.setattr(hub, "hf_hub_download", push_after_the_weights)
    assert_same_phi(old, hub_load(server.url, cache))
    monkeypatch.setattr(hub, "hf_hub_download", download)
    assert_same_phi(new, hub_load(server.url, cache))  # the next load sees the push whole


def test_a_card_pushed_to_a_branch_loads_that_branch(tmp_path: Path) -> None:
    card = save_pretrained(make_phi(), tmp_path, repo_id=REPO, revision="v2") / "README.md"
    assert f'phi="{REPO}", revision="v2")' in card.read_text()
    card = save_pretrained(make_phi(), tmp_path, repo_id=REPO, revision="main") / "README.md"
    assert f'phi="{REPO}")' in card.read_text()


def test_hub_repo_without_config(server: HubStandIn, cache: Path, tmp_path: Path) -> None:
    phi = make_phi(3, source_dataset="tiny-imagenet")
    files = folder_bytes(phi, tmp_path)
    del files["config.json"]
    server.add(REPO, "main", files)
    loaded = hub_load(server.url, cache)
    assert_same_phi(phi, loaded)  # the config travels in the safetensors header too
    server.stop()
    assert_same_phi(phi, hub_load(server.url, cache, local_files_only=True))


def test_hub_lfs_redirect_to_cdn(cache: Path, tmp_path: Path) -> None:
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo("localhost", None)}
    except OSError:
        addresses = set()
    if "127.0.0.1" not in addresses:
        pytest.skip("localhost does not resolve to 127.0.0.1 here")
    phi = make_phi(4)
    with HubStandIn(cdn_host="localhost") as stand_in:
        stand_in.add(REPO, "main", folder_bytes(phi, tmp_path))
        assert_same_phi(phi, hub_load(stand_in.url, cache))
        assert stand_in.count("GET", "model.safetensors") == 0
        assert any(r.path.startswith("/cdn/blobs/") for r in stand_in.requests)


def test_hub_missing_file(server: HubStandIn, cache: Path, tmp_path: Path) -> None:
    server.add(REPO, "main", {"perturb_750.pth": b"legacy"})
    with pytest.raises(PhiNotFoundError) as caught:
        hub_load(server.url, cache)
    message = str(caught.value)
    assert REPO in message and "model.safetensors" in message
    assert "metaperturb.convert" in message


def test_hub_unknown_repo(server: HubStandIn, cache: Path) -> None:
    with pytest.raises(PhiNotFoundError) as caught:
        hub_load(server.url, cache, repo="nobody/nothing")
    message = str(caught.value)
    assert "'nobody/nothing'" in message and "not found" in message and "token" in message


def test_hub_unknown_revision(server: HubStandIn, cache: Path, tmp_path: Path) -> None:
    server.add(REPO, "main", folder_bytes(make_phi(), tmp_path))
    with pytest.raises(PhiNotFoundError, match="no revision 'v9'"):
        hub_load(server.url, cache, revision="v9")


def test_hub_server_down(cache: Path, no_retry_wait: None) -> None:
    with pytest.raises(PhiNotFoundError) as caught:
        hub_load(closed_port_url(), cache)
    message = str(caught.value)
    assert REPO in message and "could not be reached" in message
    assert "bundled default" in message and "metaperturb.wrap(model)" in message
    assert "local folder" in message and "HF_HUB_OFFLINE=1" in message


def test_hub_offline_without_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PhiNotFoundError, match="offline mode is on.*bundled default"):
        hub_load(closed_port_url(), cache)


def test_hub_local_files_only_without_cache(cache: Path) -> None:
    with pytest.raises(PhiNotFoundError, match="local_files_only=True.*bundled default"):
        hub_load(closed_port_url(), cache, local_files_only=True)


def test_push_to_hub_uploads_a_saved_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []
    uploaded: dict[str, bytes] = {}

    def create_repo(self: Any, repo_id: str, **kwargs: Any) -> None:
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def create_branch(self: Any, repo_id: str, **kwargs: Any) -> None:
        calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self: Any, **kwargs: Any) -> Any:
        calls.append(("upload_folder", kwargs))
        uploaded.update({p.name: p.read_bytes() for p in Path(kwargs["folder_path"]).iterdir()})
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/{'a' * 40}",
            commit_message=kwargs["commit_message"],
            commit_description="",
            oid="a" * 40,
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    phi = make_phi(source_dataset="tiny-imagenet")
    url = push_to_hub(phi, REPO, revision="v1", private=True, commit_message="phi*")
    assert url == f"https://huggingface.co/{REPO}/commit/{'a' * 40}"
    assert [name for name, _ in calls] == ["create_repo", "create_branch", "upload_folder"]
    assert calls[0][1]["exist_ok"] is True and calls[0][1]["private"] is True
    assert calls[1][1]["branch"] == "v1"
    assert calls[2][1]["revision"] == "v1" and calls[2][1]["commit_message"] == "phi*"
    assert sorted(uploaded) == ["README.md", "config.json", "model.safetensors"]
    assert f'phi="{REPO}", revision="v1")' in uploaded["README.md"].decode()
    assert not Path(calls[2][1]["folder_path"]).exists()  # the temporary folder is gone
