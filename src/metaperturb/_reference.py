"""phi written the obvious way: the slow, plainly correct reference for tests and benchmarks.

Depthwise convolutions with ``groups=C`` and expanded kernels, the 4C-map grouped convolution of
the scale path, ``torch.distributions.Normal`` for the noise, one op per line of METHOD.md. The
fast path in :mod:`metaperturb.site` must compute the same function (``tests/test_fast_path.py``)
and ``benchmarks/overhead.py`` measures how much faster it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Normal

from .phi import ChannelEquivariantConv, Perturbation, expected_softplus
from .site import EvalMode, SiteState

__all__ = ["reference_perturb"]


def _equivariant(op: ChannelEquivariantConv, x: Tensor) -> Tensor:
    channels = x.shape[1]
    own = F.conv2d(x, op.self_weight.expand(channels, 1, 3, 3), padding=1, groups=channels)
    shared = F.conv2d(x.mean(dim=1, keepdim=True), op.mean_weight, padding=1)
    return own + shared


def reference_perturb(
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
) -> Tensor:
    """The same contract as :func:`metaperturb.site.perturb` (fp32 throughout).

    ``noise`` is the standard normal draw (``a = mu + noise``); by default one is sampled.
    """
    if h.shape[0] == 0 or (not training and eval_mode == "off"):
        return h
    batch, channels = h.shape[:2]
    x = h.float()

    if training:
        kernels = phi.scale_kernels.repeat(channels, 1, 1, 1)
        maps = F.relu(F.conv2d(x, kernels, padding=1, groups=channels))
        pooled = maps.mean(dim=(2, 3)).view(batch, channels, 4).float()
        mean, var = pooled.mean(dim=0), pooled.var(dim=0, unbiased=False)
        if update_statistics:
            state.running_mean.lerp_(mean.detach(), phi.config.momentum)
            state.running_var.lerp_(var.detach(), phi.config.momentum)
    else:
        mean, var = state.running_mean.float(), state.running_var.float()
    descriptors = torch.stack(
        [spatial_ratio.new_tensor(channel_ratio).float(), spatial_ratio.float()]
    )
    features = torch.cat([mean, var, descriptors.expand(channels, 2)], dim=1)
    scale = torch.sigmoid(features @ phi.scale_weight.t()).view(1, channels, 1, 1)

    mu = _equivariant(phi.noise_out, F.relu(_equivariant(phi.noise_in, x)))
    if training or eval_mode == "sample":
        a = Normal(mu, torch.ones_like(mu)).rsample() if noise is None else mu + noise.float()
        z = F.softplus(a)
    else:
        z = expected_softplus(mu)

    gain = (scale * z - 1.0) * strength + 1.0
    out = x * gain
    clip = phi.config.active_clip(training)
    if clip is not None:
        out = torch.clamp(out, max=clip)
    return out.to(h.dtype)
