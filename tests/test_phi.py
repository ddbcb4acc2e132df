"""phi and one site: parameter count, equivariance, ranges, annealing, statistics, dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metaperturb.errors import SiteShapeError
from metaperturb.phi import (
    ChannelEquivariantConv,
    Perturbation,
    PerturbationConfig,
    expected_softplus,
)
from metaperturb.site import SiteState, perturb


def run_site(
    h, phi, state=None, *, strength=1.0, training=True, eval_mode="expectation", noise=None
):
    state = state if state is not None else SiteState(h.shape[1])
    return perturb(
        h,
        phi,
        state,
        strength=torch.tensor(strength),
        channel_ratio=h.shape[1] / 64,
        spatial_ratio=torch.tensor(h.shape[-2] / 32),
        training=training,
        eval_mode=eval_mode,
        noise=noise,
    )


@pytest.fixture
def phi() -> Perturbation:
    torch.manual_seed(0)
    phi = Perturbation()
    with torch.no_grad():  # a phi with a clearly non-zero noise mean, as a trained one has
        for p in phi.parameters():
            p.normal_(0.0, 0.3)
    return phi


def test_phi_has_exactly_82_parameters() -> None:
    phi = Perturbation()
    shapes = {name: tuple(p.shape) for name, p in phi.named_parameters()}
    assert shapes == {
        "scale_kernels": (4, 1, 3, 3),
        "scale_weight": (1, 10),
        "noise_in.self_weight": (1, 1, 3, 3),
        "noise_in.mean_weight": (1, 1, 3, 3),
        "noise_out.self_weight": (1, 1, 3, 3),
        "noise_out.mean_weight": (1, 1, 3, 3),
    }
    assert sum(p.numel() for p in phi.parameters()) == 82


def test_equivariant_op_equals_dense_conv() -> None:
    torch.manual_seed(1)
    op = ChannelEquivariantConv()
    with torch.no_grad():
        op.self_weight.normal_()
        op.mean_weight.normal_()
    x = torch.randn(3, 7, 9, 11)
    dense = F.conv2d(x, op.dense_weight(7), padding=1)
    torch.testing.assert_close(op(x), dense, rtol=1e-5, atol=1e-5)


def test_noise_mean_is_channel_permutation_equivariant(phi: Perturbation) -> None:
    x = torch.randn(2, 6, 8, 8)
    perm = torch.randperm(6)
    torch.testing.assert_close(phi.noise_mean(x[:, perm]), phi.noise_mean(x)[:, perm])
    maps = phi.scale_maps(x)
    torch.testing.assert_close(phi.scale_maps(x[:, perm]), maps[:, perm])


def test_gain_is_positive_and_scale_in_unit_interval(phi: Perturbation) -> None:
    h = torch.rand(8, 5, 6, 6) + 0.1  # positive features so out / h is the gain
    out = run_site(h, phi)
    gain = out / h
    assert (gain > 0).all()
    maps = phi.scale_maps(h)
    scale = phi.channel_scale(maps.mean(0), maps.var(0), 5 / 64, torch.tensor(0.2))
    assert scale.shape == (5,)
    assert ((scale >= 0) & (scale <= 1)).all()


def test_scale_maps_are_positively_homogeneous(phi: Perturbation) -> None:
    """relu(conv(a h)) = a relu(conv(h)) for a > 0 (no bias): features a times larger move the
    maps' batch means a times and their variances a^2 times, so s's logit is a A + a^2 B + D
    in the size a of the features (benchmarks/scale_response.py reads phi's weights that way)."""
    h = torch.randn(6, 5, 8, 8)
    for a in (0.25, 3.0):
        torch.testing.assert_close(phi.scale_maps(a * h), a * phi.scale_maps(h))
    assert not torch.allclose(phi.scale_maps(-h), -phi.scale_maps(h))  # relu: not for a < 0


def test_strength_zero_is_identity_and_one_is_s_times_z(phi: Perturbation) -> None:
    h = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(run_site(h, phi, strength=0.0), h, rtol=0, atol=0)

    noise = torch.randn_like(h)
    out = run_site(h, phi, strength=1.0, noise=noise)
    maps = phi.scale_maps(h)
    scale = phi.channel_scale(
        maps.mean(0), maps.var(0, unbiased=False), 3 / 64, torch.tensor(5 / 32)
    )
    mu = phi.noise_mean(h)
    z = F.softplus(mu + noise)
    torch.testing.assert_close(out, h * scale.view(1, -1, 1, 1) * z)

    half = run_site(h, phi, strength=0.5, noise=noise)
    torch.testing.assert_close(half, h * ((scale.view(1, -1, 1, 1) * z - 1) * 0.5 + 1))


def test_running_statistics_are_buffers_updated_in_training_only(phi: Perturbation) -> None:
    state = SiteState(4)
    assert set(dict(state.named_buffers())) == {"running_mean", "running_var"}
    h = torch.randn(16, 4, 8, 8)
    run_site(h, phi, state, training=False)
    assert torch.equal(state.running_mean, torch.zeros(4, 4))
    run_site(h, phi, state, training=True)
    maps = phi.scale_maps(h)
    torch.testing.assert_close(state.running_mean, 0.1 * maps.mean(0))
    torch.testing.assert_close(state.running_var, 0.9 + 0.1 * maps.var(0, unbiased=False))

    restored = SiteState(4)
    restored.load_state_dict(state.state_dict())
    torch.testing.assert_close(restored.running_mean, state.running_mean)


def test_batch_of_one_gives_zero_variance_not_nan(phi: Perturbation) -> None:
    state = SiteState(3)
    h = torch.randn(1, 3, 6, 6, requires_grad=True)
    out = run_site(h, phi, state)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(h.grad).all()
    # The population variance of one sample is 0: the running variance moves towards 0.
    torch.testing.assert_close(state.running_var, torch.full((3, 4), 0.9))


def test_empty_batch_passes_through(phi: Perturbation) -> None:
    h = torch.randn(0, 3, 6, 6)
    assert run_site(h, phi).shape == (0, 3, 6, 6)


def test_eval_modes(phi: Perturbation) -> None:
    state = SiteState(3)
    h = torch.randn(4, 3, 6, 6)
    for _ in range(3):
        run_site(h, phi, state)
    off = run_site(h, phi, state, training=False, eval_mode="off")
    assert off is h
    first = run_site(h, phi, state, training=False, eval_mode="expectation")
    torch.testing.assert_close(first, run_site(h, phi, state, training=False))
    sample_a = run_site(h, phi, state, training=False, eval_mode="sample")
    sample_b = run_site(h, phi, state, training=False, eval_mode="sample")
    assert not torch.equal(sample_a, sample_b)
    # The expectation is the mean of many samples.
    many = torch.stack(
        [run_site(h, phi, state, training=False, eval_mode="sample") for _ in range(4000)]
    )
    torch.testing.assert_close(many.mean(0), first, rtol=0.05, atol=0.02)


def test_expected_softplus_matches_quadrature_and_monte_carlo() -> None:
    mu = torch.linspace(-12, 12, 2401, dtype=torch.float64)
    # A 64-point Gauss-Hermite rule (Golub-Welsch) is exact to double precision here.
    k = torch.arange(1, 64, dtype=torch.float64).sqrt()
    nodes, vectors = torch.linalg.eigh(torch.diag(k, 1) + torch.diag(k, -1))
    exact = (vectors[0, :, None] ** 2 * F.softplus(mu + nodes[:, None])).sum(0)
    assert (expected_softplus(mu) - exact).abs().max() < 3.5e-4
    torch.manual_seed(0)
    few = torch.linspace(-4, 4, 9, dtype=torch.float64)
    samples = F.softplus(few[:, None] + torch.randn(9, 400_000, dtype=torch.float64)).mean(1)
    torch.testing.assert_close(expected_softplus(few), samples, rtol=0, atol=5e-3)


def test_frozen_phi_gets_no_gradient_even_if_requires_grad_is_forced(phi: Perturbation) -> None:
    phi.freeze()
    phi.requires_grad_(True)  # what a host's model.requires_grad_(True) would do
    h = torch.randn(4, 3, 6, 6, requires_grad=True)
    run_site(h, phi).sum().backward()
    assert all(p.grad is None for p in phi.parameters())
    assert h.grad is not None and h.grad.abs().sum() > 0

    phi.freeze(False)
    run_site(h, phi).sum().backward()
    assert all(p.grad is not None for p in phi.parameters())


def test_clip_applies_in_training_and_in_eval_unless_told_otherwise(phi: Perturbation) -> None:
    phi.config = PerturbationConfig(clip=0.5)
    h = torch.full((4, 3, 6, 6), 10.0)
    assert run_site(h, phi).max() <= 0.5
    for mode in ("expectation", "sample"):
        assert run_site(h, phi, training=False, eval_mode=mode).max() <= 0.5
    assert torch.equal(run_site(h, phi, training=False, eval_mode="off"), h)
    phi.config = PerturbationConfig(clip=0.5, clip_in_eval=False)  # the authors' evaluation
    assert run_site(h, phi).max() <= 0.5
    for mode in ("expectation", "sample"):
        assert run_site(h, phi, training=False, eval_mode=mode).max() > 0.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_input_dtype(phi: Perturbation, dtype: torch.dtype) -> None:
    h = torch.randn(4, 3, 6, 6, dtype=dtype)
    with torch.autocast("cpu", dtype=dtype):
        out = run_site(h, phi)
        out_eval = run_site(h, phi, training=False)
    assert out.dtype == dtype and out_eval.dtype == dtype
    assert torch.isfinite(out.float()).all()


def test_float64_and_channels_last(phi: Perturbation) -> None:
    phi = phi.double()
    h = torch.randn(4, 3, 6, 6, dtype=torch.float64).to(memory_format=torch.channels_last)
    state = SiteState(3).double()
    out = run_site(h, phi, state)
    assert out.dtype == torch.float64
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_wrong_channel_count_is_a_clear_error(phi: Perturbation) -> None:
    with pytest.raises(SiteShapeError, match="model changed after wrap"):
        run_site(torch.randn(2, 5, 4, 4), phi, SiteState(3))


def test_config_validation_and_round_trip() -> None:
    config = PerturbationConfig(
        channel_norm=64, spatial_norm=32, placement="before_activation", metadata={"a": "b"}
    )
    assert PerturbationConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="clip"):
        PerturbationConfig(clip=-1)
    with pytest.raises(TypeError, match="clip_in_eval"):
        PerturbationConfig(clip_in_eval="no")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="placement must be 'output' or 'before_activation'"):
        PerturbationConfig(placement="inside")
    with pytest.raises(ValueError, match="Unknown phi config keys"):
        PerturbationConfig.from_dict({"future_option": 1})


def test_from_pretrained_save_pretrained_round_trip(tmp_path, phi: Perturbation) -> None:
    phi.config = PerturbationConfig(channel_norm=64, metadata={"source_dataset": "test"})
    folder = phi.save_pretrained(tmp_path / "phi")
    loaded = Perturbation.from_pretrained(folder)
    assert loaded.config.channel_norm == 64
    assert loaded.config.metadata["source_dataset"] == "test"
    for (name, a), (_, b) in zip(
        phi.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_channel_scale_takes_a_cpu_spatial_ratio_beside_statistics_on_another_device() -> None:
    """The evaluation reads phi's scale per site with a CPU descriptor while the running
    statistics live on the model's device (this crashed on CUDA; "meta" stands in for it)."""
    phi = Perturbation().to("meta")
    mean, var = torch.zeros(5, 4, device="meta"), torch.ones(5, 4, device="meta")
    s = phi.channel_scale(mean, var, 0.5, torch.tensor(0.25))
    assert s.shape == (5,) and s.device.type == "meta"
