"""The fused CPU kernels compute what the PyTorch path computes, and fall back cleanly.

The PyTorch path is itself checked against the obvious reference (``test_fast_path.py``); here
every case runs both ways on the same input and the same noise. The kernels draw their noise
with Philox4x32-10 (``torch.randn`` on the PyTorch path), so a comparison gives the PyTorch path
the kernels' numbers.
"""

from __future__ import annotations

import io
import os
import shutil
import warnings
from typing import Any

import pytest
import timm
import torch

import metaperturb
import metaperturb._native as native
from metaperturb import site
from metaperturb.phi import Perturbation
from metaperturb.site import SiteState, perturb

HAS_COMPILER = shutil.which("c++") is not None and shutil.which("ninja") is not None
TURNED_OFF = os.environ.get("METAPERTURB_NATIVE", "").strip().lower() in ("0", "false", "off", "no")

pytestmark = [
    pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler or ninja here"),
    pytest.mark.skipif(TURNED_OFF, reason="METAPERTURB_NATIVE=0"),
]


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    # A machine with a compiler must build them: a silent fallback would hide a broken build.
    assert native.kernels() is not None


def make_phi(frozen: bool) -> Perturbation:
    torch.manual_seed(0)
    phi = Perturbation()
    with torch.no_grad():
        for p in phi.parameters():
            p.normal_(0.0, 0.3)
    return phi.freeze(frozen)


def run(
    phi: Perturbation,
    h: torch.Tensor,
    noise: torch.Tensor | None,
    training: bool,
    mode: str,
    grad: bool = True,
    fused: bool = True,
) -> dict[str, Any]:
    state = SiteState(h.shape[1])
    state.running_mean.uniform_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    h = h.detach().requires_grad_(grad)
    phi.zero_grad(set_to_none=True)
    torch.manual_seed(11)  # where the kernels draw their noise's key (noise=None)
    out = perturb(
        h,
        phi,
        state,
        strength=torch.tensor(0.8),
        channel_ratio=0.5,
        spatial_ratio=torch.tensor(0.25),
        training=training,
        eval_mode=mode,  # type: ignore[arg-type]
        noise=noise,
        fused=fused,
    )
    result: dict[str, Any] = {"out": out.detach(), "stride": out.stride(), "state": state}
    if grad:
        upstream = torch.linspace(-1, 1, out.numel()).view(out.shape)
        (out * upstream).sum().backward()
        result["h"] = h.grad
        result["phi"] = {n: p.grad for n, p in phi.named_parameters()}
    return result


# The last is wider than the kernels' channel blocks (64), with a partial block at the end.
SHAPES = [(6, 5, 9, 7), (3, 16, 8, 8), (1, 3, 1, 1), (2, 1, 4, 1), (4, 8, 1, 5), (2, 150, 3, 4)]
MODES = [(True, "expectation"), (False, "sample"), (False, "expectation")]


def kernel_noise(h: torch.Tensor) -> torch.Tensor:
    """The noise the kernels draw for ``h`` after ``run``'s ``torch.manual_seed(11)``."""
    torch.manual_seed(11)
    return native.standard_normal(native.kernel_layout(h), native.draw_key())


# The deterministic eval (not training, "expectation") draws no noise.
CASES = [(*m, "given") for m in MODES] + [(*m, "drawn") for m in MODES if m[0] or m[1] == "sample"]


@pytest.mark.parametrize("training,mode,noise_source", CASES)
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_kernels_match_the_pytorch_path(
    shape: tuple[int, ...],
    channels_last: bool,
    frozen: bool,
    training: bool,
    mode: str,
    noise_source: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``given``: both paths take the same noise tensor. ``drawn``: the kernels draw their own
    (forward, then again in backward), and the PyTorch path is given those numbers."""
    generator = torch.Generator().manual_seed(2)
    h = torch.randn(shape, generator=generator)
    noise: torch.Tensor | None = torch.randn(shape, generator=generator)
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    assert native.usable(h, torch.float32)  # else both runs below would be the PyTorch path
    # Eval without gradients is the one case the expectation kernel serves.
    grad = training or mode == "sample"
    if noise_source == "drawn":
        fused = run(make_phi(frozen), h, None, training, mode, grad)
        noise = kernel_noise(h)
    else:
        fused = run(make_phi(frozen), h, noise, training, mode, grad)
    expected = run(make_phi(frozen), h, noise, training, mode, grad, fused=False)

    torch.testing.assert_close(fused["out"], expected["out"], rtol=1e-4, atol=1e-5)
    assert fused["stride"] == expected["stride"], "the output keeps the input's layout"
    torch.testing.assert_close(fused["state"].running_var, expected["state"].running_var)
    if grad:
        torch.testing.assert_close(fused["h"], expected["h"], rtol=1e-4, atol=1e-5)
        for name, value in expected["phi"].items():
            if value is None:
                assert fused["phi"][name] is None, name
            else:
                torch.testing.assert_close(
                    fused["phi"][name], value, rtol=1e-3, atol=1e-4, msg=name
                )


def test_the_clamp_and_its_gradient_match(monkeypatch: pytest.MonkeyPatch) -> None:
    """Features large enough that the training clamp at 100 cuts some of them."""
    generator = torch.Generator().manual_seed(3)
    h = torch.randn(4, 6, 5, 5, generator=generator) * 200
    noise = torch.randn(h.shape, generator=generator)
    fused = run(make_phi(True), h, noise, True, "expectation")
    assert (fused["out"] == 100).any() and (fused["out"] < 100).any()
    expected = run(make_phi(True), h, noise, True, "expectation", fused=False)
    torch.testing.assert_close(fused["out"], expected["out"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused["h"], expected["h"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("clip_in_eval", [True, False])
@pytest.mark.parametrize("mode", ["expectation", "sample"])
def test_the_eval_clamp_matches(mode: str, clip_in_eval: bool) -> None:
    """In eval the clamp holds too, in both modes (unless ``clip_in_eval`` is off), and the
    kernels cut exactly what the PyTorch path cuts."""
    generator = torch.Generator().manual_seed(6)
    h = torch.randn(4, 6, 5, 5, generator=generator).relu() * 200
    noise = torch.randn(h.shape, generator=generator)
    outputs = []
    for fused in (True, False):
        phi = make_phi(True)
        phi.config.clip_in_eval = clip_in_eval
        outputs.append(run(phi, h, noise, False, mode, grad=False, fused=fused)["out"])
    assert (outputs[1] > 100).any() != clip_in_eval
    assert (outputs[1] < 100).any()
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_non_finite_features_give_what_the_pytorch_path_gives(
    training: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = torch.rand(2, 4, 6, 6)
    h[0, 1, 2, 3] = float("nan")
    h[1, 2, 0, 0] = float("inf")
    noise = torch.randn(h.shape, generator=torch.Generator().manual_seed(4))
    fused = run(make_phi(True), h, noise, training, "expectation", grad=False)["out"]
    expected = run(make_phi(True), h, noise, training, "expectation", False, False)["out"]
    assert torch.equal(fused.isnan(), expected.isnan())
    assert torch.equal(fused.isinf(), expected.isinf())
    finite = expected.isfinite()
    torch.testing.assert_close(fused[finite], expected[finite], rtol=1e-4, atol=1e-5)


def test_results_do_not_depend_on_the_thread_count() -> None:
    """Batch reductions are summed per image, then in a fixed order: bit-identical results."""
    h = torch.randn(8, 6, 7, 7, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(h.shape, generator=torch.Generator().manual_seed(6))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(make_phi(False), h, noise, True, "expectation")
        torch.set_num_threads(2)
        two = run(make_phi(False), h, noise, True, "expectation")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one["out"], two["out"]) and torch.equal(one["h"], two["h"])
    for name, value in one["phi"].items():
        assert torch.equal(value, two["phi"][name]), name


def test_the_generator_is_philox4x32_10() -> None:
    """Known-answer vectors of Random123, the generator's reference implementation."""
    kernels = native.kernels()
    assert kernels is not None
    full = 0xFFFFFFFF
    pi = [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]
    assert kernels.philox([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert kernels.philox([full] * 4, [full] * 2) == [
        0x408F276D,
        0x41C83B0E,
        0xA20BC7C6,
        0x6D5451FD,
    ]
    assert kernels.philox(pi, [0xA4093822, 0x299F31D0]) == [
        0xD16CFE09,
        0x94FDCCEB,
        0x5001E420,
        0x24126EA1,
    ]


def test_the_kernel_noise_is_standard_normal_and_keyed() -> None:
    h = torch.empty(64, 16, 32, 32).contiguous(memory_format=torch.channels_last)  # 1M values
    z = native.standard_normal(h, 1234).flatten()
    assert torch.isfinite(z).all()
    assert abs(z.mean().item()) < 5e-3 and abs(z.var().item() - 1) < 5e-3
    assert abs((z**3).mean().item()) < 2e-2 and abs((z**4).mean().item() - 3) < 3e-2
    # Kolmogorov-Smirnov distance to N(0, 1) on 1M draws: 1.63 / sqrt(n) is the 1% level.
    ordered = torch.sort(z.double()).values
    cdf = 0.5 * (1 + torch.erf(ordered / 2**0.5))
    steps = torch.arange(1, z.numel() + 1, dtype=torch.float64) / z.numel()
    assert (cdf - steps).abs().max().item() < 1.63 / z.numel() ** 0.5 + 1 / z.numel()
    # Neighbours (the same pixel's channels, one counter's four words) are uncorrelated.
    image = z.view(64, -1)
    for lag in (1, 4, 16, image.shape[1] // 4):
        correlation = (image[:, :-lag] * image[:, lag:]).mean().item()
        assert abs(correlation) < 5e-3, lag
    assert torch.equal(native.standard_normal(h, 1234).flatten(), z)
    other = native.standard_normal(h, 1235).flatten()
    assert abs((z * other).mean().item()) < 5e-3  # another key: independent numbers
    images = z.view(64, -1)
    assert abs((images[0] * images[1]).mean().item()) < 2e-2  # images differ


def test_kernel_noise_does_not_depend_on_the_thread_count() -> None:
    h = torch.randn(9, 6, 7, 5).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.standard_normal(h, 99)
        torch.set_num_threads(max(2, threads))
        two = native.standard_normal(h, 99)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert torch.equal(native.standard_normal(h[:4], 99), one[:4])  # image b's noise is its own


def test_torch_manual_seed_fixes_the_kernel_noise() -> None:
    model = timm.create_model("cifar_resnet20")
    metaperturb.wrap(model)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(3)
    first = model(x)
    torch.manual_seed(3)
    assert torch.equal(model(x), first)
    assert not torch.equal(model(x), first)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_a_training_site_keeps_only_its_input_for_backward(channels_last: bool) -> None:
    """The noise is drawn again in backward and an NCHW map is read in place, so a site saves h
    (which the host keeps anyway) and phi's small tensors: no noise, pre-activation or
    channels_last copy of h's size."""
    h = torch.randn(8, 16, 32, 32)
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    h.requires_grad_(True)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(make_phi(False), h, None, True, "expectation", grad=False)
    others = sum(size for ptr, size in saved.items() if ptr != h.untyped_storage().data_ptr())
    assert h.untyped_storage().data_ptr() in saved
    assert others < 0.05 * h.untyped_storage().nbytes()


@pytest.mark.parametrize(
    "training,mode", [(True, "expectation"), (False, "sample"), (False, "expectation")]
)
def test_nchw_and_channels_last_give_the_same_numbers(training: bool, mode: str) -> None:
    """The kernels read either layout, and a value's noise depends on its position alone, so
    the two layouts give the same output and gradients, bit for bit, each in its own layout."""
    h = torch.randn(5, 6, 7, 9, generator=torch.Generator().manual_seed(8))
    grad = training or mode == "sample"
    # The deterministic eval kernel serves a frozen phi without autograd.
    nchw = run(make_phi(not grad), h, None, training, mode, grad)
    cl = run(
        make_phi(not grad),
        h.contiguous(memory_format=torch.channels_last),
        None,
        training,
        mode,
        grad,
    )
    assert nchw["out"].is_contiguous() and cl["out"].is_contiguous(
        memory_format=torch.channels_last
    )
    assert torch.equal(nchw["out"], cl["out"])
    if grad:
        assert torch.equal(nchw["h"], cl["h"])
        for name, value in nchw["phi"].items():
            other = cl["phi"][name]
            assert (value is None and other is None) or torch.equal(value, other), name


def test_a_map_in_neither_layout_is_read_through_a_copy() -> None:
    base = torch.randn(4, 6, 8, 10, generator=torch.Generator().manual_seed(9))
    sliced = base[:, :, :, ::2]  # strided: neither contiguous layout
    assert not sliced.is_contiguous() and not sliced.is_contiguous(
        memory_format=torch.channels_last
    )
    fused = run(make_phi(True), sliced, None, True, "expectation")
    expected = run(make_phi(True), sliced.contiguous(), None, True, "expectation")
    assert torch.equal(fused["out"], expected["out"])
    assert torch.equal(fused["h"], expected["h"])


def test_a_wrapped_resnet_trains_the_same_either_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole model, same seed: the loss, the input gradient and one Adam step agree when the
    PyTorch path draws its noise as the kernels do (a key from torch's generator per site)."""

    def step() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        torch.manual_seed(7)
        model = timm.create_model("cifar_resnet20")
        metaperturb.wrap(model)
        x = torch.randn(4, 3, 32, 32, requires_grad=True)
        loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
        loss.backward()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        optimizer.step()
        model.eval()
        with torch.no_grad():
            evaluated = model(x.detach())
        return loss.detach(), x.grad, evaluated

    fused = step()
    monkeypatch.setattr(native, "usable", lambda *args: False)
    monkeypatch.setattr(
        site,
        "standard_normal_like",
        lambda t: native.standard_normal(native.kernel_layout(t), native.draw_key()),
    )
    expected = step()
    for actual, wanted in zip(fused, expected, strict=True):
        torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-5)


def test_turned_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setenv("METAPERTURB_NATIVE", "0")
    assert native.kernels() is None
    assert not native.usable(torch.zeros(1, 1, 1, 1), torch.float32)


def test_a_failed_build_warns_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise OSError("c++: not found")

    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failed", None)
    monkeypatch.setattr(native, "_build", broken)
    monkeypatch.delenv("METAPERTURB_NATIVE", raising=False)
    with pytest.warns(RuntimeWarning, match="did not build.*c\\+\\+: not found"):
        assert native.kernels() is None
    assert native.kernels() is None  # once: no second build, no second warning
    monkeypatch.setattr(native, "_failed", None)
    monkeypatch.setenv("METAPERTURB_NATIVE", "1")
    with pytest.raises(RuntimeError, match="METAPERTURB_NATIVE=1 but the fused CPU kernels"):
        native.kernels()


def test_other_dtypes_and_autocast_keep_the_pytorch_path() -> None:
    h = torch.zeros(2, 3, 4, 4)
    assert native.usable(h, torch.float32)
    assert not native.usable(h.double(), torch.float64)
    assert not native.usable(h.bfloat16(), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not native.usable(h, torch.float32)


def test_torch_jit_trace_records_the_pytorch_path() -> None:
    """A traced (and saved) model cannot carry the compiled kernels: tracing takes the PyTorch
    ops, which compute the same thing."""
    model = timm.create_model("cifar_resnet20")
    metaperturb.wrap(model)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    traced = torch.jit.trace(model, x, check_trace=False)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.save's deprecation notice
        torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)
