"""Converting the authors' legacy phi checkpoint to a metaperturb phi."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub.repocard import metadata_load

from metaperturb.convert import OFFICIAL_KEY_MAP, convert_official_checkpoint, main
from metaperturb.errors import PhiFormatError, PhiNotFoundError
from metaperturb.hub import load_phi, save_pretrained
from metaperturb.phi import PerturbationConfig

# The authors' file lives beside the checkout (../shared) and is never copied into the repo.
OFFICIAL = Path(__file__).parents[2] / "shared/reference/official-perturb_750.pth"
needs_official = pytest.mark.skipif(
    not OFFICIAL.is_file(), reason=f"the authors' checkpoint is not at {OFFICIAL}"
)

SHAPES = {
    "phi_1.w_identity": (1, 1, 3, 3),
    "phi_1.w_all": (1, 1, 3, 3),
    "phi_2.w_identity": (1, 1, 3, 3),
    "phi_2.w_all": (1, 1, 3, 3),
    "kernel": (4, 1, 3, 3),
    "fc.weight": (1, 10),
}


def legacy_state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def write_legacy(path: Path, state: object) -> Path:
    torch.save(state, path)
    return path


# Written out here, not read from the module: the conversion is checked against this table, so
# a swapped pair in convert.py (e.g. the two ops' kernels) fails every test below. METHOD.md:
# phi_1 and phi_2 are the noise generator's two ops E1 and E2, ``w_identity`` the kernel every
# channel gets on its own (lam), ``w_all`` the one on the channel mean (gam).
AUTHORS_TO_OURS = {
    "phi_1.w_identity": "noise_in.self_weight",
    "phi_1.w_all": "noise_in.mean_weight",
    "phi_2.w_identity": "noise_out.self_weight",
    "phi_2.w_all": "noise_out.mean_weight",
    "kernel": "scale_kernels",
    "fc.weight": "scale_weight",
}


def assert_mapped(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(AUTHORS_TO_OURS.values())
    for their_name, our_name in AUTHORS_TO_OURS.items():
        assert ours[our_name].dtype == torch.float32
        assert torch.equal(ours[our_name], theirs[their_name].float()), our_name


def test_key_map_is_complete() -> None:
    assert sorted(AUTHORS_TO_OURS) == sorted(SHAPES)
    assert OFFICIAL_KEY_MAP == AUTHORS_TO_OURS


def test_synthetic_checkpoint_maps_exactly(tmp_path: Path) -> None:
    state = legacy_state()
    phi = convert_official_checkpoint(write_legacy(tmp_path / "perturb.pth", state))
    # The authors' fc sees [mean (4), var (4), C/channel_norm, H/spatial_norm], our order: the
    # weight is copied column for column, not permuted.
    assert_mapped(state, phi.state_dict())
    assert phi.config.metadata["source_dataset"] == "tiny-imagenet"
    assert "do not redistribute" in phi.config.metadata["source"]
    assert phi.config.channel_norm is None and phi.config.spatial_norm is None


def test_legacy_non_zip_serialisation(tmp_path: Path) -> None:
    state = legacy_state(1)
    path = tmp_path / "old.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert_mapped(state, convert_official_checkpoint(path).state_dict())


@needs_official
def test_official_checkpoint_converts_exactly(tmp_path: Path) -> None:
    theirs = torch.load(OFFICIAL, map_location="cpu", weights_only=True)
    phi = convert_official_checkpoint(OFFICIAL)
    assert_mapped(theirs, phi.state_dict())
    metadata = phi.config.metadata
    assert metadata["source"].startswith("official MetaPerturb checkpoint (Ryu et al. 2020)")
    assert metadata["source_architecture"] == "resnet20 (pre-activation features)"
    assert len(metadata["source_sha256"]) == 64
    assert phi.config.placement == "before_activation"  # where their phi acted

    loaded = load_phi(save_pretrained(phi, tmp_path / "official"))
    assert_mapped(theirs, loaded.state_dict())
    assert loaded.config == phi.config


@pytest.mark.slow
@needs_official
def test_official_checkpoint_cli(tmp_path: Path) -> None:
    out = tmp_path / "converted"
    result = subprocess.run(
        [sys.executable, "-m", "metaperturb.convert", str(OFFICIAL), str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "do not redistribute" in result.stdout
    theirs = torch.load(OFFICIAL, map_location="cpu", weights_only=True)
    assert_mapped(theirs, load_phi(out).state_dict())
    card = metadata_load(out / "README.md")
    assert card is not None and card["license"] == "other"
    assert "do not redistribute" in (out / "README.md").read_text()


def test_main_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = legacy_state(2)
    path = write_legacy(tmp_path / "perturb.pth", state)
    assert main([str(path), str(tmp_path / "out")]) == 0
    assert_mapped(state, load_phi(tmp_path / "out").state_dict())
    assert "out" in capsys.readouterr().out


def test_main_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "missing.pth"), str(tmp_path / "out")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _drop(state: dict[str, torch.Tensor]) -> object:
    del state["kernel"]
    return state


def _extra(state: dict[str, torch.Tensor]) -> object:
    state["fc.bias"] = torch.zeros(1)
    return state


def _reshape(state: dict[str, torch.Tensor]) -> object:
    state["fc.weight"] = torch.zeros(10, 1)
    return state


def _integer(state: dict[str, torch.Tensor]) -> object:
    state["phi_1.w_all"] = torch.zeros(1, 1, 3, 3, dtype=torch.int64)
    return state


def _nan(state: dict[str, torch.Tensor]) -> object:
    state["phi_2.w_identity"][0, 0, 0, 0] = float("nan")
    return state


def _not_a_dict(state: dict[str, torch.Tensor]) -> object:
    return list(state.values())


def _nested(state: dict[str, torch.Tensor]) -> object:
    return {"state_dict": state}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (_drop, ["missing", "'kernel'"]),
        (_extra, ["unexpected", "'fc.bias'"]),
        (_reshape, ["'fc.weight'", "(10, 1)", "(1, 10)"]),
        (_integer, ["'phi_1.w_all'", "int64"]),
        (_nan, ["'phi_2.w_identity'", "NaN"]),
        (_not_a_dict, ["list", "state dict"]),
        (_nested, ["state dict"]),
    ],
    ids=["missing", "extra", "shape", "dtype", "nan", "list", "nested"],
)
def test_bad_legacy_files(tmp_path: Path, change: object, words: list[str]) -> None:
    assert callable(change)
    path = write_legacy(tmp_path / "bad.pth", change(legacy_state()))
    with pytest.raises(PhiFormatError) as caught:
        convert_official_checkpoint(path)
    for word in words:
        assert word in str(caught.value)


def test_arbitrary_objects_are_refused(tmp_path: Path) -> None:
    """weights_only=True: a pickle of anything but tensors and containers is not executed."""
    path = write_legacy(tmp_path / "evil.pth", {"config": PerturbationConfig()})
    with pytest.raises(PhiFormatError, match="plain tensors"):
        convert_official_checkpoint(path)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(PhiFormatError):
        convert_official_checkpoint(path)
    with pytest.raises(PhiNotFoundError):
        convert_official_checkpoint(tmp_path / "absent.pth")
