"""Bad input to the library: each case gives a clear error or a documented, tested behaviour.

The cases already pinned elsewhere (test_wrap, test_phi, test_hub, test_integrations) are listed
in docs/reliability.md with the test that pins them; this file holds the rest, the
property-based tests of the site function and a short fuzz of the phi loader.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_save
from torch import nn

import metaperturb
from hub_server import HubStandIn
from metaperturb import NoSitesError, NotWrappedError, Perturbation
from metaperturb._serialization import weights_bytes
from metaperturb.errors import (
    AlreadyWrappedError,
    HubCacheError,
    ModelChangedError,
    PhiFormatError,
    SiteDtypeError,
    SiteShapeError,
)
from metaperturb.hub import load_phi, save_pretrained
from metaperturb.phi import expected_softplus
from metaperturb.site import SiteState, perturb
from test_wrap import MyBlock, MyPlainNet, MyResNet, wrapped

# ---------------------------------------------------------------------------------------------
# Sites that cannot take phi
# ---------------------------------------------------------------------------------------------


class TupleBlock(MyBlock):
    def forward(self, x: torch.Tensor) -> Any:  # type: ignore[override]
        y = super().forward(x)
        return y, y.mean()


class DictBlock(MyBlock):
    def forward(self, x: torch.Tensor) -> Any:  # type: ignore[override]
        return {"out": super().forward(x)}


class TokenBlock(MyBlock):
    """A ViT-style block: convolves, then returns (B, tokens, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).flatten(2).transpose(1, 2)


class PooledBlock(MyBlock):
    """Convolves a spatial map, then pools it to 1x1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(super().forward(x), 1)


class NarrowBlock(nn.Module):
    """A block whose output has a single channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(channels, channels, 3, padding=1)
        self.b = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(self.a(x))) + x.mean(1, keepdim=True)


class Mixed(nn.Module):
    """One usable block among blocks of every kind phi cannot follow."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.good = MyBlock(8)
        self.tup = TupleBlock(8)
        self.dic = DictBlock(8)
        self.narrow = NarrowBlock(8)
        self.pooled = PooledBlock(8)
        self.tok = TokenBlock(8)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.good(self.stem(x))
        x = self.dic(self.tup(x)[0])["out"]
        pooled = self.pooled(x).flatten(1)
        narrow = self.narrow(x)
        return self.head(torch.cat([pooled, self.tok(x).mean(1) + narrow.mean()], 1)[:, :16])


def test_inspect_says_why_each_unusable_block_is_skipped() -> None:
    plan = metaperturb.inspect(Mixed(), input_size=(3, 8, 8))
    assert [s.name for s in plan.sites] == ["good"]
    reasons = {s.name: s.reason for s in plan.skipped}
    assert "returns a tuple" in reasons["tup"]
    assert "returns a dict" in reasons["dic"]
    assert "3-D tensor" in reasons["tok"] and "(B, C, H, W)" in reasons["tok"]
    assert "1x1 feature map" in reasons["pooled"]
    assert "1 channel" in reasons["narrow"] and "at least 2" in reasons["narrow"]
    text = str(plan)
    for name in ("tup", "dic", "tok", "pooled", "narrow"):
        assert f"    {name} " in text


def test_wrap_keeps_the_usable_block_of_a_mixed_model_and_runs() -> None:
    model = wrapped(Mixed())
    assert metaperturb.get_controller(model).site_names == ["good"]
    model.train()
    assert torch.isfinite(model(torch.randn(2, 3, 16, 16))).all()


class NoneLeft(nn.Module):
    """Convolutions, but only to 1 channel or to a 1x1 map: nowhere phi can go."""

    def __init__(self) -> None:
        super().__init__()
        self.narrow = nn.Conv2d(3, 1, 3, padding=1)
        self.pooled = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(1, 8, 1))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(self.narrow(x)).flatten(1))


def test_model_with_no_usable_site_raises_and_says_why() -> None:
    with pytest.raises(NoSitesError) as caught:
        metaperturb.wrap(NoneLeft(), phi=Perturbation(), input_size=(3, 8, 8))
    message = str(caught.value)
    assert "no module after which phi can be applied" in message
    assert "narrow" in message and "1 channel" in message


# ---------------------------------------------------------------------------------------------
# Tensors through a wrapped model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 0])
def test_wrapped_model_takes_batches_of_one_and_zero_in_training(batch: int) -> None:
    model = wrapped(MyResNet()).train()
    controller = metaperturb.get_controller(model)
    before = copy.deepcopy(controller.state_dict())
    out = model(torch.randn(batch, 3, 16, 16))
    assert out.shape == (batch, 5) and torch.isfinite(out).all()
    after = controller.state_dict()
    for key, value in after.items():
        assert torch.isfinite(value).all(), key
        if batch == 0 and "running" in key:  # an empty batch leaves the statistics alone
            assert torch.equal(value, before[key]), key
    if batch == 1:  # one example: population variance 0, so the running variance moves to 0.9
        torch.testing.assert_close(after["sites.0.running_var"], torch.full((8, 4), 0.9))


def test_float64_model_stays_float64() -> None:
    model = wrapped(MyResNet()).double().train()
    assert model(torch.randn(2, 3, 16, 16, dtype=torch.float64)).dtype == torch.float64
    assert metaperturb.get_controller(model).sites[0].running_mean.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.long])
def test_input_of_another_dtype_is_the_hosts_error_not_a_silent_cast(dtype: torch.dtype) -> None:
    model = wrapped(MyResNet())
    with pytest.raises(RuntimeError, match="should be the same"):
        model(torch.ones(2, 3, 16, 16, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.long, torch.uint8, torch.bool])
@pytest.mark.parametrize("training", [True, False])
def test_site_refuses_integer_features(dtype: torch.dtype, training: bool) -> None:
    # Before: a RuntimeError about casting in training, and a gain silently rounded to 0 in eval.
    h = torch.ones(2, 3, 4, 4, dtype=dtype)
    with pytest.raises(SiteDtypeError, match="floating-point feature maps") as caught:
        run_site(h, PHIS[0], training=training)
    assert isinstance(caught.value, TypeError)


def test_non_contiguous_features_give_the_contiguous_result() -> None:
    torch.manual_seed(0)
    base = torch.randn(3, 8, 6, 7)
    views = [base[:, ::2], base.transpose(2, 3), base[:, :, 1:, ::2]]
    for view in views:
        assert not view.is_contiguous()
        for training in (True, False):
            torch.manual_seed(1)
            out = run_site(view, PHIS[1], training=training)
            torch.manual_seed(1)
            expected = run_site(view.contiguous(), PHIS[1], training=training)
            assert out.shape == view.shape
            torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_features_are_not_hidden(bad: float) -> None:
    """Documented behaviour: phi never masks a non-finite feature.

    In eval mode the damage stays in the bad example (its 5x5 neighbourhood, all channels); in
    training it reaches the batch statistics, so the whole batch and the site's running
    statistics turn NaN, as BatchNorm's do.
    """
    torch.manual_seed(0)
    h = torch.randn(4, 3, 12, 12)
    h[0, 1, 2, 2] = bad
    out = run_site(h, PHIS[1], training=False)
    assert not torch.isfinite(out[0]).all()
    assert torch.isfinite(out[1:]).all()
    assert torch.isfinite(out[0, :, 6:, 6:]).all()  # outside the 5x5 neighbourhood
    state = SiteState(3)
    out = run_site(h, PHIS[1], state, training=True)
    assert not torch.isfinite(out[1:]).all()
    assert not torch.isfinite(state.running_var).all()


# ---------------------------------------------------------------------------------------------
# wrap / unwrap misuse and models changed after wrap
# ---------------------------------------------------------------------------------------------


def test_a_revision_without_a_hub_phi_is_named_as_ignored() -> None:
    with pytest.warns(UserWarning, match=r"revision='v2' only applies to a Hub repository"):
        metaperturb.wrap(MyResNet(), phi=Perturbation(), revision="v2", input_size=(3, 16, 16))


def test_wrap_after_torch_compile_is_an_error_unwrap_through_it_works() -> None:
    with pytest.raises(TypeError, match="wrap the plain model first"):
        metaperturb.wrap(torch.compile(MyResNet()), phi=Perturbation(), input_size=(3, 16, 16))
    model = wrapped(MyResNet())
    compiled = torch.compile(model)
    with pytest.raises(AlreadyWrappedError):
        metaperturb.wrap(compiled, phi=Perturbation(), input_size=(3, 16, 16))
    metaperturb.unwrap(compiled)  # the compiled module forwards attributes to the model
    assert not metaperturb.is_wrapped(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    # An nn.Sequential host gets its own class back through the compiled module too.
    sequential = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
    metaperturb.wrap(sequential, phi=Perturbation(), input_size=(3, 16, 16))
    assert type(sequential) is not nn.Sequential  # while wrapped
    compiled = torch.compile(sequential)
    assert metaperturb.unwrap(compiled) is compiled
    assert type(sequential) is nn.Sequential


def test_fx_symbolic_tracing_of_a_wrapped_model_says_what_to_do_instead() -> None:
    model = wrapped(MyResNet())
    with pytest.raises(TypeError, match=r"torch.fx symbolic tracing.*trace the model before wrap"):
        torch.fx.symbolic_trace(model)
    traced = torch.fx.symbolic_trace(MyResNet())  # traced first, then wrapped: fine
    metaperturb.wrap(traced, phi=Perturbation(), input_size=(3, 16, 16))
    assert traced(torch.randn(2, 3, 16, 16)).shape == (2, 5)


@pytest.fixture
def process_group(tmp_path: Path) -> Iterator[None]:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_wrap_after_ddp_is_an_error_and_unwrap_asks_for_module(process_group: None) -> None:
    ddp = nn.parallel.DistributedDataParallel(MyResNet())
    with pytest.raises(TypeError, match="wrap the plain model first"):
        metaperturb.wrap(ddp, phi=Perturbation(), input_size=(3, 16, 16))
    ddp = nn.parallel.DistributedDataParallel(wrapped(MyResNet()))
    with pytest.raises(AlreadyWrappedError, match="already wrapped"):
        metaperturb.wrap(ddp, phi=Perturbation(), input_size=(3, 16, 16))
    with pytest.raises(NotWrappedError, match=r"unwrap\(ddp.module\)"):
        metaperturb.unwrap(ddp)
    metaperturb.unwrap(ddp.module)
    assert not metaperturb.is_wrapped(ddp.module)


def test_site_channels_changed_after_wrap_is_a_site_shape_error() -> None:
    torch.manual_seed(0)
    model = metaperturb.wrap(MyPlainNet(), phi=Perturbation(), input_size=(1, 16, 16))
    with torch.no_grad():  # prune the site "c3" in place: 6 output channels instead of 8
        model.c3.weight = nn.Parameter(model.c3.weight[:6].clone())
        model.c3.bias = nn.Parameter(model.c3.bias[:6].clone())
    model.c3.out_channels = 6
    with pytest.raises(SiteShapeError, match=r"\(B, 8, H, W\).*\(2, 6, 4, 4\).*unwrap"):
        model(torch.randn(2, 1, 16, 16))


@pytest.mark.parametrize("replace", ["site", "parent"])
def test_replacing_a_site_module_after_wrap_is_an_error(replace: str) -> None:
    # Before: the new module carried no hook and the site silently stopped perturbing.
    model = wrapped(MyResNet())
    x = torch.randn(2, 3, 16, 16)
    if replace == "site":
        model.body[1] = MyBlock(8)
    else:
        model.body = nn.Sequential(MyBlock(8), MyBlock(8), MyBlock(16, stride=2), MyBlock(16))
    with pytest.raises(ModelChangedError, match="'body.1'|'body.0'") as caught:
        model(x)
    assert "unwrap" in str(caught.value)
    metaperturb.unwrap(model)
    wrapped(model)  # wrapping again after the change works
    model.train()
    perturbed = model(x)
    with metaperturb.disabled(model):
        assert not torch.allclose(model(x), perturbed)


def test_a_deepcopy_and_a_replaced_head_keep_working() -> None:
    model = wrapped(MyResNet())
    model.head = nn.Linear(16, 7)  # not a site: fine-tuning a new head is allowed
    clone = copy.deepcopy(model)
    assert clone(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)


# ---------------------------------------------------------------------------------------------
# Property-based tests of the site function
# ---------------------------------------------------------------------------------------------


def _make_phi(std: float | None) -> Perturbation:
    torch.manual_seed(0)
    phi = Perturbation()
    if std is not None:
        with torch.no_grad():
            for p in phi.parameters():
                p.normal_(0.0, std)
    return phi.freeze()


# An untrained phi (weights N(0, 0.01)) and one with large weights, as a trained one may have.
PHIS = [_make_phi(None), _make_phi(0.3)]


def run_site(
    h: torch.Tensor,
    phi: Perturbation,
    state: SiteState | None = None,
    *,
    training: bool = True,
    eval_mode: str = "expectation",
    strength: float = 1.0,
    channel_ratio: float = 0.5,
    spatial_ratio: float = 0.5,
) -> torch.Tensor:
    state = state if state is not None else SiteState(h.shape[1])
    return perturb(
        h,
        phi,
        state,
        strength=torch.tensor(strength),
        channel_ratio=channel_ratio,
        spatial_ratio=torch.tensor(spatial_ratio),
        training=training,
        eval_mode=eval_mode,  # type: ignore[arg-type]
    )


def overflow_bound(phi: Perturbation, dtype: torch.dtype) -> float:
    """Largest |h| for which ``h * g`` provably fits ``dtype`` (phi computes in fp32 at least).

    ``|mu| <= k |h|max`` with ``k`` the product of the two equivariant ops' L1 norms, and
    ``g <= softplus(mu + noise) + 1 <= |mu| + 8`` (noise below 6 sigma), so ``|h g| <= k M^2 + 8M``;
    the batch variance of the scale maps (at most ``(K M)^2``, ``K`` the scale kernels' largest L1
    norm) must fit fp32 too.
    """
    k = 1.0
    for op in (phi.noise_in, phi.noise_out):
        k *= float(op.self_weight.abs().sum() + op.mean_weight.abs().sum())
    limit = min(torch.finfo(dtype).max, torch.finfo(torch.float32).max) / 4
    product = (-8 + (64 + 4 * k * limit) ** 0.5) / (2 * k)
    kernels = float(phi.scale_kernels.abs().sum(dim=(1, 2, 3)).max())
    statistics = (torch.finfo(torch.float32).max / 100) ** 0.5 / kernels
    return float(min(product, statistics))


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.slow
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(0, 4),
    channels=st.integers(1, 6),
    height=st.integers(1, 7),
    width=st.integers(1, 7),
    dtype=st.sampled_from(DTYPES),
    autocast=st.booleans(),
    layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
    training=st.booleans(),
    eval_mode=st.sampled_from(["expectation", "sample", "off"]),
    phi_index=st.integers(0, 1),
    pattern=st.sampled_from(["normal", "relu", "constant", "alternating", "zeros"]),
    fraction=st.floats(0.0, 1.0),
    strength=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_site_function_properties(
    batch: int,
    channels: int,
    height: int,
    width: int,
    dtype: torch.dtype,
    autocast: bool,
    layout: str,
    training: bool,
    eval_mode: str,
    phi_index: int,
    pattern: str,
    fraction: float,
    strength: float,
    seed: int,
) -> None:
    """Any shape, dtype, layout and mode: shape and dtype kept, finite features stay finite
    below the overflow bound, strength 0 is the identity (clipped at 100 unless off), eval expectation
    is deterministic and the running statistics stay finite."""
    autocast = autocast and dtype in (torch.bfloat16, torch.float16)
    phi = PHIS[phi_index]
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, channels, height, width)
    raw = torch.randn(shape, generator=generator, dtype=torch.float64)
    if pattern == "relu":
        raw = raw.relu()
    elif pattern == "constant":
        raw = torch.ones(shape, dtype=torch.float64)
    elif pattern == "alternating":
        raw = torch.ones(shape, dtype=torch.float64)
        raw[..., ::2, ::2] = -1
    elif pattern == "zeros":
        raw = torch.zeros(shape, dtype=torch.float64)
    raw = raw / raw.abs().max().clamp(min=1e-12) if raw.numel() else raw
    h = (raw * fraction * overflow_bound(phi, dtype)).to(dtype)
    if layout == "channels_last":
        h = h.to(memory_format=torch.channels_last)
    elif layout == "strided":
        h = torch.cat([h, h], dim=3)[..., ::2]
    state = SiteState(channels)

    def call(**kwargs: Any) -> torch.Tensor:
        options: dict[str, Any] = {"training": training, "eval_mode": eval_mode, **kwargs}
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            return run_site(h, phi, state, **options)

    out = call(strength=strength)
    assert out.shape == h.shape
    assert out.dtype == h.dtype
    assert torch.isfinite(out).all()
    assert torch.isfinite(state.running_mean).all() and torch.isfinite(state.running_var).all()
    identity = call(strength=0.0)
    expected = h if not training and eval_mode == "off" else h.clamp(max=100.0)
    assert torch.equal(identity, expected)
    if not training and eval_mode == "expectation":
        assert torch.equal(call(strength=strength), out)


def test_overflow_bound_is_tight_enough_to_matter() -> None:
    """The property test's bound is no formality: 1000x beyond it, fp16 does overflow (seen
    without the clamp, which would turn +inf into 100)."""
    phi = copy.deepcopy(PHIS[1])
    phi.config.clip = None
    bound = overflow_bound(phi, torch.float16)
    assert 1.0 < bound < 1e3
    h = torch.full((2, 3, 6, 6), bound * 1000).half()
    assert not torch.isfinite(run_site(h, phi, training=False)).all()


def test_fp16_autocast_statistics_past_65504_do_not_make_s_nan() -> None:
    # The scale head runs elementwise in fp32: an fp16 matmul (as CUDA autocast makes it) would
    # overflow once a batch variance of the scale maps passes 65504, and inf - inf would make s
    # NaN. CPU autocast leaves that matmul in fp32, so this pins the behaviour, not the old bug.
    torch.manual_seed(0)
    phi = Perturbation()
    with torch.no_grad():
        phi.scale_kernels.normal_(0.0, 1.0)
        phi.scale_weight.normal_(0.0, 0.3)
    h = torch.full((4, 3, 6, 6), 200.0, dtype=torch.float16)
    h[0] = 0
    state = SiteState(3)
    phi.freeze()
    with torch.autocast("cpu", dtype=torch.float16):
        assert float(phi.scale_maps(h).float().var(0).max()) > 65504
        for training in (True, False):
            assert torch.isfinite(run_site(h, phi, state, training=training)).all()


@pytest.mark.parametrize("training", [True, False])
def test_zero_features_stay_zero_where_the_gain_overflows_fp16(training: bool) -> None:
    # Before: the fp32 gain cast to fp16 was inf next to large features, and 0 * inf = NaN.
    phi = copy.deepcopy(PHIS[1])
    with torch.no_grad():
        for op in (phi.noise_in, phi.noise_out):
            op.self_weight.mul_(3)
            op.mean_weight.mul_(3)
    h = torch.zeros(2, 3, 6, 6, dtype=torch.float16)
    h[:, :, 2:4, 2:4] = 60000.0
    z = expected_softplus(phi.noise_mean(h.float()))
    assert float(z[h == 0].max()) > 2 * 65504  # the gain next to the large features overflows
    out = run_site(h, phi, training=training)
    assert torch.equal(out[h == 0], h[h == 0])
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("training", [True, False])
def test_fp32_features_past_the_overflow_bound_overflow_to_inf_not_nan(training: bool) -> None:
    # Before: at 1e25 the batch variance overflowed to inf and inf - inf made s NaN.
    torch.manual_seed(0)
    h = torch.randn(4, 3, 6, 6) * 1e25
    out = run_site(h, PHIS[1], training=training)
    assert not torch.isnan(out).any()
    assert torch.isinf(out).any()  # the clamp turns +inf into 100, -inf stays


# ---------------------------------------------------------------------------------------------
# phi files
# ---------------------------------------------------------------------------------------------


def _valid_state() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in PHIS[1].state_dict().items()}


VALID = safetensors_save(_valid_state())
VALID_WITH_CONFIG = weights_bytes(PHIS[1])  # what save_pretrained writes: config in the header


def _write(tmp_path: Path, data: bytes, name: str = "phi.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _safetensors(header: dict[str, Any], payload: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + payload


def test_float64_file_is_accepted_and_values_beyond_float32_are_refused(tmp_path: Path) -> None:
    state = {k: v.double() for k, v in _valid_state().items()}
    loaded = load_phi(_write(tmp_path, safetensors_save(state)))
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    state["scale_weight"][0, 0] = 1e300  # finite in float64, infinite as float32
    with pytest.raises(PhiFormatError, match="'scale_weight' holds NaN or infinite"):
        load_phi(_write(tmp_path, safetensors_save(state), "big.safetensors"))


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        (
            "tensor claiming 40 GB",
            _safetensors(
                {
                    "scale_weight": {
                        "dtype": "F32",
                        "shape": [100_000, 100_000],
                        "data_offsets": [0, 40_000_000_000],
                    }
                },
                bytes(64),
            ),
        ),
        (
            "shape overflowing 64 bits",
            _safetensors(
                {
                    "scale_weight": {
                        "dtype": "F32",
                        "shape": [2**40, 2**40],
                        "data_offsets": [0, 40],
                    }
                },
                bytes(64),
            ),
        ),
        ("header nested 100000 deep", struct.pack("<Q", 100_000) + b"[" * 100_000),
        ("object nested 100000 deep", struct.pack("<Q", 600_000) + b'{"a": ' * 100_000),
    ],
)
def test_header_claims_are_checked_before_anything_is_allocated(
    tmp_path: Path, kind: str, data: bytes
) -> None:
    # The nested headers raised RecursionError before.
    with pytest.raises(PhiFormatError, match="not a valid safetensors file"):
        load_phi(_write(tmp_path, data))


def test_config_nested_too_deeply_is_a_format_error(tmp_path: Path) -> None:
    folder = save_pretrained(PHIS[0], tmp_path / "phi")
    (folder / "config.json").write_text("[" * 100_000)
    with pytest.raises(PhiFormatError, match="not valid JSON"):
        load_phi(folder)
    header = {"__metadata__": {"metaperturb_config": "[" * 100_000}}
    with pytest.raises(PhiFormatError, match="not valid JSON"):
        load_phi(_write(tmp_path, _safetensors(header)))


def _check_loaded_or_format_error(path: Path) -> None:
    try:
        phi = load_phi(path)
    except PhiFormatError:
        return
    assert sum(p.numel() for p in phi.parameters()) == 82
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in phi.parameters())


@pytest.mark.slow
@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    base=st.sampled_from([VALID, VALID_WITH_CONFIG]),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 2_000)),
    insert=st.one_of(st.none(), st.tuples(st.integers(0, 2_000), st.binary(max_size=20))),
)
def test_fuzzed_phi_files_load_or_raise_phi_format_error(
    tmp_path_factory: pytest.TempPathFactory,
    base: bytes,
    edits: list[tuple[int, int]],
    cut: int | None,
    insert: tuple[int, bytes] | None,
) -> None:
    data = bytearray(base)
    for position, value in edits:
        data[position % len(data)] = value
    if insert is not None:
        data[insert[0] : insert[0]] = insert[1]
    if cut is not None:
        data = data[:cut]
    _check_loaded_or_format_error(_write(tmp_path_factory.mktemp("fuzz"), bytes(data)))


@pytest.mark.slow
@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.binary(max_size=300))
def test_random_bytes_are_a_phi_format_error(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    with pytest.raises(PhiFormatError):
        load_phi(_write(tmp_path_factory.mktemp("random"), data))


@pytest.mark.slow
@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    header=st.dictionaries(
        st.sampled_from(["scale_weight", "scale_kernels", "__metadata__", "x"]),
        st.recursive(
            st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
            max_leaves=8,
        ),
        max_size=4,
    ),
    payload=st.binary(max_size=64),
)
def test_fuzzed_headers_raise_phi_format_error(
    tmp_path_factory: pytest.TempPathFactory, header: dict[str, Any], payload: bytes
) -> None:
    with pytest.raises(PhiFormatError):
        load_phi(_write(tmp_path_factory.mktemp("header"), _safetensors(header, payload)))


# ---------------------------------------------------------------------------------------------
# A read-only Hub cache
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def hub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)


def make_read_only(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Simulate a read-only mount of ``root`` (the tests may run as root, which chmod can't stop):
    every call that would create or write a file under it fails with EROFS."""
    prefix = str(root.resolve())

    def inside(path: Any) -> bool:
        try:
            return os.path.abspath(os.fspath(path)).startswith(prefix)
        except TypeError:  # a file descriptor
            return False

    def refuse(path: Any) -> None:
        raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))

    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    real_open, real_mkdir = os.open, os.mkdir
    real_replace, real_rename, real_symlink = os.replace, os.rename, os.symlink

    def guarded_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & writes and inside(path):
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if inside(path):
            if os.path.isdir(path):
                raise FileExistsError(errno.EEXIST, "File exists", os.fspath(path))
            refuse(path)
        real_mkdir(path, *args, **kwargs)

    def guarded_two(real: Any) -> Any:
        def call(source: Any, target: Any, *args: Any, **kwargs: Any) -> Any:
            if inside(target):
                refuse(target)
            return real(source, target, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)
    monkeypatch.setattr(os, "replace", guarded_two(real_replace))
    monkeypatch.setattr(os, "rename", guarded_two(real_rename))
    monkeypatch.setattr(os, "symlink", guarded_two(real_symlink))


def test_read_only_hub_cache(
    hub_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {p.name: p.read_bytes() for p in save_pretrained(PHIS[1], tmp_path / "s").iterdir()}
    cache = tmp_path / "cache"
    with HubStandIn() as server:
        server.add("org/phi", "main", files)
        server.add("org/other", "main", files)
        options: dict[str, Any] = {"endpoint": server.url, "cache_dir": cache, "token": False}
        load_phi("org/phi", **options)
        make_read_only(monkeypatch, cache)
        # Already cached: loads without writing, online or not.
        for phi in (
            load_phi("org/phi", **options),
            load_phi("org/phi", local_files_only=True, **options),
        ):
            assert torch.equal(phi.scale_weight, PHIS[1].scale_weight)
        # Not cached: a clear error naming the cache and the fix.
        with pytest.raises(HubCacheError) as caught:
            load_phi("org/other", **options)
    message = str(caught.value)
    assert "'org/other'" in message and str(cache) in message and "cache_dir=" in message
    assert isinstance(caught.value, PermissionError)
