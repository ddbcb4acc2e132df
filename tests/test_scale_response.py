"""benchmarks/scale_response.py: its reading of phi's scale weights and its s are the library's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import metaperturb
from benchmark_scripts import load
from metaperturb.diagnostics import mean_channel_scales
from test_diagnostics import plain_net


def _scale_response() -> Any:
    return load("scale_response")


def test_the_weight_tables_are_the_scale_logit() -> None:
    """The README's reading of phi* (negative weights on every live map's mean and variance)
    rests on which of the 10 weights the script names: rebuild s's logit from its tables."""
    script = _scale_response()
    phi = metaperturb.hub.load_phi(metaperturb.hub.default_phi_path())
    maps, descriptors = script.scale_weights(phi), script.descriptor_weights(phi)
    torch.manual_seed(0)
    mean, var = torch.rand(6, 4), torch.rand(6, 4)
    channels, height = 0.5, torch.tensor(0.25)
    logit = (
        sum(
            mean[:, m] * maps[m]["mean_weight"] + var[:, m] * maps[m]["var_weight"]
            for m in range(4)
        )
        + descriptors["channels"] * channels
        + descriptors["height"] * height
    )
    s = phi.channel_scale(mean, var, channels, height)
    torch.testing.assert_close(s, torch.sigmoid(logit), atol=1e-6, rtol=0)
    kernels = phi._weight(phi.scale_kernels).detach().reshape(4, -1)
    assert [entry["kernel_sum"] for entry in maps] == pytest.approx(kernels.sum(1).tolist())


def test_mean_scale_is_what_a_site_computes_from_the_same_batch() -> None:
    """Give each site's running statistics one batch's statistics: the s the library reads from
    them (descriptors included) is the s the script computes from that batch's features."""
    script = _scale_response()
    model = metaperturb.wrap(plain_net(), input_size=(3, 16, 16))
    controller = metaperturb.get_controller(model)
    phi = controller.phi
    captured: dict[str, torch.Tensor] = {}
    for name in controller.site_names:
        model.get_submodule(name).register_forward_hook(
            lambda m, a, out, name=name: captured.__setitem__(name, out.detach()), prepend=True
        )
    with torch.no_grad():
        model(torch.randn(8, 3, 16, 16) * 2)
        for name, state in zip(controller.site_names, controller.sites, strict=True):
            maps = phi.scale_maps(captured[name]).float()
            state.running_mean.copy_(maps.mean(dim=0))
            state.running_var.copy_(maps.var(dim=0, unbiased=False))
    library = mean_channel_scales(model)
    widest, height = controller.plan.widest, float(controller.input_height)
    for name, h in captured.items():
        assert script.mean_scale(phi, h, widest, height) == pytest.approx(library[name], abs=1e-6)
    # The sites differ in channels and size, so the descriptors were exercised, not constant.
    assert len({tuple(h.shape[1:]) for h in captured.values()}) >= 2


def test_sign_forms_tell_size_from_sign() -> None:
    """--signs compares s on h, on its non-negative part and on both at one RMS: the forms must
    be exactly that, and a site with nothing positive gives zeros, not NaN."""
    script = _scale_response()
    torch.manual_seed(0)
    h = torch.randn(4, 3, 5, 5) * 3 - 1
    forms = script.sign_forms(h, size=2.0)
    assert list(forms) == ["h", "relu(h)", "h at RMS 2", "relu(h) at RMS 2"]
    assert forms["h"] is h and bool((forms["relu(h)"] >= 0).all())
    assert torch.equal(forms["relu(h)"] > 0, h > 0)
    for name in ("h at RMS 2", "relu(h) at RMS 2"):
        assert script.rms(forms[name]) == pytest.approx(2.0, rel=1e-5)
    # Rescaling keeps the sign pattern: only the size changes.
    assert torch.equal(forms["h at RMS 2"] < 0, h < 0)
    negative = script.sign_forms(-h.abs() - 0.1)
    assert torch.equal(negative["relu(h) at RMS 2"], torch.zeros_like(h))


def test_the_variance_term_is_the_logit_minus_the_rest() -> None:
    """The --signs table's bracket is the variance part of s's logit: the logit with the maps'
    variances set to zero differs from the full one by exactly that."""
    script = _scale_response()
    phi = metaperturb.hub.load_phi(metaperturb.hub.default_phi_path())
    torch.manual_seed(0)
    h = torch.randn(6, 2, 8, 8).abs()
    with torch.no_grad():
        maps = phi.scale_maps(h).float()
        mean, var, height = maps.mean(0), maps.var(0, unbiased=False), torch.tensor(1.0)
        full = torch.logit(phi.channel_scale(mean, var, 1.0, height).double())
        zero = torch.zeros_like(var)
        without = torch.logit(phi.channel_scale(mean, zero, 1.0, height).double())
    expected = float((full - without).mean())
    assert abs(expected) > 1e-3  # phi* weighs the variances: the check is not empty
    assert script.variance_term(phi, h) == pytest.approx(expected, abs=1e-4)


CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


@pytest.mark.skipif(not CIFAR10.is_dir(), reason=f"{CIFAR10} not present")
def test_signs_on_a_host_whose_sites_see_non_negative_features() -> None:
    """--signs end to end on an untrained Conv4 (phi after each unit's ReLU): every site's
    features are non-negative, so s on h and on relu(h) must agree."""
    script = _scale_response()
    phis = {"phi-star": metaperturb.hub.load_phi(metaperturb.hub.default_phi_path())}
    report = script.measure_signs(phis, "s-cifar10", 0, "conv4", None, "phi-star")
    assert report["step"] == 0 and report["trained_with"] is None
    assert len(report["sites"]) == 4  # one site after each conv unit
    for entry in report["sites"].values():
        assert entry["negative"] == 0.0
        s = entry["s"]["phi-star"]
        assert s["h"] == pytest.approx(s["relu(h)"], abs=1e-6)
        assert all(0 < value < 1 for value in s.values())
    assert "| phi-star |" in script.signs_markdown(report)
