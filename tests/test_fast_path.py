"""The fast site computes the same function as the obvious reference implementation.

Same seed, same noise: forward values, and gradients to the input and to phi, in train and
eval modes, NCHW and channels_last, fp32 and bf16.
"""

from __future__ import annotations

import pytest
import torch

from metaperturb._reference import reference_perturb
from metaperturb.phi import Perturbation
from metaperturb.site import SiteState, perturb

MODES = [(True, "expectation"), (False, "expectation"), (False, "sample")]
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]


def make_phi() -> Perturbation:
    torch.manual_seed(0)
    phi = Perturbation()
    with torch.no_grad():
        for p in phi.parameters():
            p.normal_(0.0, 0.3)
    return phi


def run(fn, phi: Perturbation, h: torch.Tensor, noise: torch.Tensor, training: bool, mode: str):
    state = SiteState(h.shape[1])
    state.running_mean.uniform_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    state = state.to(h.device)
    h = h.detach().requires_grad_(True)
    phi.zero_grad(set_to_none=True)
    out = fn(
        h,
        phi,
        state,
        strength=torch.tensor(0.8, device=h.device),
        channel_ratio=0.5,
        spatial_ratio=torch.tensor(0.25, device=h.device),
        training=training,
        eval_mode=mode,
        noise=noise,
    )
    upstream = torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape).to(out.dtype)
    (out * upstream).sum().backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in phi.named_parameters()}
    return out.detach(), h.grad, grads, state


@pytest.mark.parametrize("training,mode", MODES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(6, 5, 9, 7), (3, 16, 8, 8)])
@pytest.mark.parametrize("device", DEVICES)
def test_fast_path_matches_reference(shape, dtype, channels_last, training, mode, device) -> None:
    phi = make_phi().to(device)
    generator = torch.Generator().manual_seed(2)
    h = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    noise = torch.randn(shape, generator=generator).to(device)
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    fast = run(perturb, phi, h, noise, training, mode)
    ref = run(reference_perturb, phi, h, noise, training, mode)

    def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        if dtype == torch.float32:
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=what)
            return
        # bf16 keeps 8 significant bits and phi's convolutions run in bf16 (as under autocast,
        # with bf16 accumulation on a CPU): compare with the fp32 reference in relative norm.
        difference = (actual.float() - expected.float()).norm().item()
        assert difference <= 0.08 * expected.float().norm().item() + 1e-6, (
            f"{what}: {difference:.3g}"
        )

    assert fast[0].dtype == dtype
    if channels_last:
        assert fast[0].is_contiguous(memory_format=torch.channels_last)
    close(fast[0], ref[0], "output")
    close(fast[1], ref[1], "input gradient")
    for name, expected in ref[2].items():
        if expected is None:  # eval mode: the running statistics replace the scale path
            assert fast[2][name] is None, name
        else:
            close(fast[2][name], expected, name)
    close(fast[3].running_mean, ref[3].running_mean, "running mean")
    close(fast[3].running_var, ref[3].running_var, "running variance")


@pytest.mark.parametrize("beta", [1.0, 0.919])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_vectorised_softplus_matches_torch(beta, dtype) -> None:
    """The CPU softplus (relu - log sigmoid) equals F.softplus over the whole range, tails included."""
    from metaperturb._kernels import softplus

    x = torch.cat([torch.linspace(-120, 120, 20001), torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    # logaddexp, not F.softplus: the latter returns x itself above its threshold (20).
    wide = x.double() * beta
    expected = torch.logaddexp(wide, torch.zeros_like(wide)) / beta
    got = softplus(x.to(dtype), beta=beta).double()
    assert torch.isfinite(got).all()
    tolerance = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
    assert torch.allclose(got, expected, rtol=tolerance, atol=tolerance)
    assert (got >= 0).all()


FORMS = [
    ("depthwise", "depthwise"),
    ("depthwise", "grouped"),
    ("batched", "batched"),
    ("batched", "depthwise"),
]


@pytest.mark.parametrize("forms", FORMS, ids=["+".join(f) for f in FORMS])
@pytest.mark.parametrize("training,mode", MODES[:2])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("device", DEVICES)
def test_every_convolution_form_matches_reference(forms, training, mode, channels_last, device):
    """The layouts phi's shared-kernel convolutions can take are speed settings, not
    different functions: each matches the reference, values and gradients."""
    phi = make_phi().to(device)
    phi.conv_forms = forms
    generator = torch.Generator().manual_seed(3)
    h = torch.randn(4, 6, 7, 5, generator=generator).to(device)
    noise = torch.randn(h.shape, generator=generator).to(device)
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    fast = run(perturb, phi, h, noise, training, mode)
    ref = run(reference_perturb, phi, h, noise, training, mode)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast[1], ref[1], rtol=1e-4, atol=1e-5)
    for name, expected in ref[2].items():
        if expected is not None:
            torch.testing.assert_close(fast[2][name], expected, rtol=1e-4, atol=1e-5, msg=name)


def test_an_unknown_convolution_form_is_refused() -> None:
    phi = make_phi()
    phi.conv_forms = ("winograd", "depthwise")  # type: ignore[assignment]
    with pytest.raises(ValueError, match="unknown convolution form 'winograd'"):
        phi.noise_mean(torch.randn(2, 3, 4, 4))
