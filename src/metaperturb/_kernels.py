"""Hand-written autograd for the two elementwise-heavy pieces of a site.

Autograd's generic graph for these keeps several full-size float tensors per site and walks
memory once per op; these functions keep what backward needs and nothing else (a boolean mask,
the noise ``z``) and compute the gradients from it in a few passes. The reference
implementation in :mod:`metaperturb._reference` checks them (``tests/test_fast_path.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "gain",
    "relu_mean",
    "sampled_gain",
    "saturating_cast",
    "softplus",
    "standard_normal_like",
]


def softplus(x: Tensor, beta: float = 1.0) -> Tensor:
    """``log(1 + exp(beta x)) / beta``, as ``relu(x) - log(sigmoid(beta |x|)) / beta``.

    The same function to float rounding, but built from ops that PyTorch vectorises on a CPU:
    ``F.softplus`` (and ``log1p``/``expm1``) run a scalar loop there, 3-4x slower than these
    four passes (``benchmarks/overhead.py``).
    """
    if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
        # One fused kernel on a GPU. Under autograd, abs() would give a zero derivative at 0,
        # where features often are exactly zero.
        return F.softplus(x, beta=beta)
    tail = x.abs()
    if beta != 1.0:
        tail.mul_(beta)
    tail = tail.sigmoid_().log_()
    return F.relu(x).sub_(tail, alpha=1.0 / beta)


class _ReluMean(torch.autograd.Function):
    """``relu(y).mean((2, 3))`` keeping a boolean mask (1 byte per element) for backward."""

    @staticmethod
    def forward(ctx: Any, y: Tensor) -> Tensor:
        keep = y > 0
        ctx.save_for_backward(keep)
        ctx.area = y.shape[2] * y.shape[3]
        return F.relu(y).mean(dim=(2, 3))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (keep,) = ctx.saved_tensors
        # A materialised gradient (not an expanded view), which convolution backward needs to
        # stay on its fast path.
        return keep * (grad / ctx.area)[:, :, None, None]


def relu_mean(y: Tensor) -> Tensor:
    """Global average of ``relu(y)`` per (example, channel): shape (B, C)."""
    result: Tensor = _ReluMean.apply(y)
    return result


def gain(z: Tensor, scale: Tensor, strength: Tensor) -> Tensor:
    """``(s z - 1) c + 1`` as ``(s c) z + (1 - c)``: one pass over the feature map."""
    c = strength.to(z.dtype)
    return torch.addcmul(1.0 - c, (scale.to(z.dtype) * c).view(1, -1, 1, 1), z)


def saturating_cast(factor: Tensor, dtype: torch.dtype) -> Tensor:
    """A non-negative gain cast to ``dtype``, clamped to its largest finite value.

    Only a cast down to fp16 (largest value 65504) can overflow. There, a gain of ``inf`` would
    turn a feature of exactly 0 (every ReLU zero) into ``0 * inf = NaN``; the clamped gain gives 0
    there and still overflows to ``inf`` wherever the perturbed feature does not fit fp16.
    """
    if dtype == torch.float16 and factor.dtype != torch.float16:
        return factor.clamp(max=torch.finfo(torch.float16).max).to(dtype)
    return factor.to(dtype)


class _SampledGain(torch.autograd.Function):
    """``h * ((s * softplus(mu + noise) - 1) * c + 1)``, clamped from above, in one function.

    Backward needs only ``h`` and ``z = softplus(mu + noise)``: ``sigmoid(mu + noise)`` is
    ``1 - exp(-z)``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        h: Tensor,
        mu: Tensor,
        noise: Tensor,
        scale: Tensor,
        strength: Tensor,
        clip: float | None,
    ) -> Tensor:
        z = softplus(mu + noise)
        factor = gain(z, scale, strength)
        out = h * saturating_cast(factor, h.dtype)
        keep = None
        if clip is not None:
            keep = out <= clip
            out = out.clamp_(max=clip)
        ctx.save_for_backward(h, z, scale, strength, keep)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        h, z, scale, strength, keep = ctx.saved_tensors
        if keep is not None:
            grad_out = grad_out * keep
        channel_scale = scale.to(z.dtype).view(1, -1, 1, 1)
        c = strength.to(z.dtype)
        grad_h = grad_mu = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_h = grad_out * saturating_cast(gain(z, scale, strength), grad_out.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            grad_gain = grad_out.to(z.dtype) * h.to(z.dtype) * c
            if ctx.needs_input_grad[3]:
                grad_scale = (grad_gain * z).sum(dim=(0, 2, 3)).to(scale.dtype)
            if ctx.needs_input_grad[1]:
                # sigmoid(a) = 1 - exp(-z); exp is vectorised where expm1 is not, and the rounding
                # (below 6e-8 absolute) only touches elements whose gradient is that small too.
                sigmoid = torch.exp(-z).neg_().add_(1.0)
                grad_mu = grad_gain.mul_(channel_scale).mul_(sigmoid)
        return grad_h, grad_mu, None, grad_scale, None, None


def sampled_gain(
    h: Tensor, mu: Tensor, noise: Tensor, scale: Tensor, strength: Tensor, clip: float | None
) -> Tensor:
    """The perturbed features for one draw of ``noise`` (see :class:`_SampledGain`)."""
    result: Tensor = _SampledGain.apply(h, mu, noise, scale, strength, clip)
    return result


def standard_normal_like(x: Tensor) -> Tensor:
    """N(0, 1) noise shaped like ``x``, generated contiguously in ``x``'s memory layout.

    ``torch.randn_like`` on a channels_last tensor fills it through strides, several times
    slower on a CPU than drawing the same numbers into contiguous memory.
    """
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        batch, channels, height, width = x.shape
        return torch.randn(batch, height, width, channels, dtype=x.dtype, device=x.device).permute(
            0, 3, 1, 2
        )
    return torch.randn(x.shape, dtype=x.dtype, device=x.device)
