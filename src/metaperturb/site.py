"""One site: the running statistics of one hooked block, and the perturbation applied there."""

from __future__ import annotations

import os
from types import ModuleType
from typing import Literal

import torch
from torch import Tensor, nn

from . import _native
from ._kernels import gain, sampled_gain, saturating_cast, standard_normal_like
from .errors import SiteDtypeError, SiteShapeError
from .phi import (
    _EXPECTATION_BUMP,
    _EXPECTATION_SLOPE,
    _EXPECTATION_WIDTH,
    Perturbation,
    expected_softplus,
)

__all__ = ["EvalMode", "SiteState", "perturb"]

#: How a site behaves in eval mode: the deterministic mean ``E[s*z]`` (one pass), one random
#: sample of ``s*z`` per pass, or no perturbation at all.
EvalMode = Literal["expectation", "sample", "off"]


#: The fitted constants of :func:`metaperturb.phi.expected_softplus`, as the kernels take them.
_EXPECTATION = (_EXPECTATION_SLOPE, _EXPECTATION_BUMP, _EXPECTATION_WIDTH)


def _triton_kernels(x: Tensor) -> ModuleType | None:
    """:mod:`metaperturb._triton` when it can take ``x``, imported on first use (it imports
    Triton); opt-in until a GPU benchmark shows it faster than the PyTorch path."""
    from . import _triton

    return _triton if _triton.usable(x) else None


class SiteState(nn.Module):
    """Running mean and variance of phi's 4 scale statistics at one site, per channel.

    Registered buffers, so they travel with ``state_dict``, ``.to()``, ``deepcopy`` and DDP's
    buffer broadcast, exactly as BatchNorm's do.
    """

    running_mean: Tensor
    running_var: Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.register_buffer("running_mean", torch.zeros(channels, 4))
        self.register_buffer("running_var", torch.ones(channels, 4))

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def perturb(
    h: Tensor,
    phi: Perturbation,
    state: SiteState,
    *,
    strength: Tensor,
    channel_ratio: float,
    spatial_ratio: Tensor,
    training: bool,
    eval_mode: EvalMode = "expectation",
    noise: Tensor | None = None,
    update_statistics: bool = True,
    fused: bool = True,
    triton: bool | None = None,
) -> Tensor:
    """``h * g`` with ``g = (s * z - 1) * strength + 1`` (MetaPerturb, METHOD.md steps 2-5).

    In training mode ``s`` comes from the batch statistics (which also update the running ones)
    and ``z`` is sampled; in eval mode ``s`` comes from the running statistics and ``z`` follows
    ``eval_mode``. The batch variance is the population variance over the batch: 0 for a batch of
    one (never NaN), and the running variance averages exactly that statistic, so eval sees the
    feature training saw. An empty batch passes through unchanged. ``noise`` replaces the
    standard normal draw (``a = mu + noise``), for tests that compare implementations;
    ``update_statistics=False`` leaves the running statistics alone (a checkpointed recompute).
    ``fused=False`` keeps the PyTorch ops where the fused CPU kernels would run (the same
    function; for comparisons). ``triton`` runs the site as Triton kernels on a GPU
    (:mod:`metaperturb._triton`: the deterministic eval site, and the sampled one while phi is
    frozen); ``None`` follows ``METAPERTURB_TRITON=1``.
    """
    if h.dim() != 4 or h.shape[1] != state.channels:
        raise SiteShapeError(
            f"a MetaPerturb site planned for (B, {state.channels}, H, W) features received shape "
            f"{tuple(h.shape)}. The model changed after wrap(): call metaperturb.unwrap(model) "
            "and wrap it again."
        )
    if not h.is_floating_point():
        raise SiteDtypeError(
            f"a MetaPerturb site received a {h.dtype} tensor; phi perturbs floating-point "
            "feature maps (a gain rounded to an integer would be wrong). The module at this site "
            "returns integers: cast its output to float, or leave it out with sites=[...]."
        )
    if h.shape[0] == 0 or (not training and eval_mode == "off"):
        return h

    # Under autocast, phi follows the autocast dtype like the host does. Outside it, phi computes in
    # its own dtype (fp32 unless the whole model was cast), so that a 16-bit input does not make
    # phi's weight gradients lose precision.
    x = h if torch.is_autocast_enabled(h.device.type) else h.to(phi.scale_weight.dtype)
    # The fused CPU kernels (float32 on a CPU, when they built) read channels_last or NCHW and
    # answer in the same layout; the deterministic eval kernel has no backward, so it serves
    # only without autograd.
    sampling = training or eval_mode == "sample"
    autograd_needed = torch.is_grad_enabled() and (h.requires_grad or not phi.frozen)
    fused = (
        fused and _native.usable(h, phi.scale_weight.dtype) and (sampling or not autograd_needed)
    )
    if fused:
        x = _native.kernel_layout(x)
    # The Triton kernels give no gradient to phi, and the eval one none at all: under autograd
    # they serve only a sampling site with phi frozen.
    if triton is None:
        triton = os.environ.get("METAPERTURB_TRITON", "") == "1"
    gpu_kernels = (
        _triton_kernels(x)
        if triton and not fused and (sampling and phi.frozen or not autograd_needed)
        else None
    )
    if training:
        if fused:
            maps = _native.scale_pool(x, phi._weight(phi.scale_kernels))
        elif gpu_kernels is not None:
            maps = gpu_kernels.scale_pool(x, phi._weight(phi.scale_kernels))
        else:
            maps = phi.scale_maps(x).float()
        mean = maps.mean(dim=0)
        var = maps.var(dim=0, unbiased=False)
        if update_statistics:
            momentum = phi.config.momentum
            state.running_mean.lerp_(mean.detach().to(state.running_mean.dtype), momentum)
            state.running_var.lerp_(var.detach().to(state.running_var.dtype), momentum)
    else:
        mean, var = state.running_mean, state.running_var
    scale = phi.channel_scale(mean, var, channel_ratio, spatial_ratio)
    clip = phi.config.active_clip(training)

    if fused and sampling:
        # The kernels draw their own noise (Philox, keyed from torch's generator) unless given.
        given = None if noise is None else _native.channels_last(noise.to(x.dtype))
        return _native.sampled(x, phi.noise_kernels(), scale, strength, clip, noise=given)
    if fused:
        return _native.expectation(x, phi.noise_kernels(), scale, strength, clip, *_EXPECTATION)
    if gpu_kernels is not None:
        if sampling:
            out = gpu_kernels.sampled(x, phi.noise_kernels(), scale, strength, clip, noise)
        else:
            out = gpu_kernels.expectation(
                x, phi.noise_kernels(), scale, strength, clip, *_EXPECTATION
            )
        return out.to(h.dtype)
    mu = phi.noise_mean(x)
    if sampling:
        draw = standard_normal_like(mu) if noise is None else noise.to(mu.dtype)
        return sampled_gain(h, mu, draw, scale, strength, clip)
    out = h * saturating_cast(gain(expected_softplus(mu), scale, strength), h.dtype)
    return out if clip is None else out.clamp_(max=clip)
