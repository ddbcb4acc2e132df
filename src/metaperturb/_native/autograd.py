"""Autograd functions over the fused CPU kernels, and when a site may use them.

The kernels take channels_last or NCHW memory (:func:`kernel_layout`) and return their result in
the same layout; they work on one image at a time in channels_last order, transposing an NCHW
image in cache rather than the whole tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import kernels

__all__ = [
    "channels_last",
    "draw_key",
    "expectation",
    "kernel_layout",
    "sampled",
    "scale_pool",
    "standard_normal",
    "usable",
]

_CHANNELS_LAST = torch.channels_last


def _labelled(name: str) -> torch.profiler.record_function:
    """The kernel's name in a ``torch.profiler`` table (``metaperturb::<name>``), which would
    otherwise fold its time into the Python or autograd frame that called it."""
    return torch.profiler.record_function(f"metaperturb::{name}")


def usable(h: Tensor, weight_dtype: torch.dtype) -> bool:
    """Whether a site may run on the fused kernels: float32 features and phi on a CPU, outside
    autocast, torch.compile and torch.jit.trace (which record the PyTorch path instead), kernels
    built."""
    return (
        h.device.type == "cpu"
        and h.dtype == torch.float32
        and weight_dtype == torch.float32
        and h.dim() == 4
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and kernels() is not None
    )


def kernel_layout(x: Tensor) -> Tensor:
    """``x`` itself if it is channels_last or contiguous NCHW (what the kernels read), else a
    contiguous copy."""
    if x.is_contiguous(memory_format=_CHANNELS_LAST) or x.is_contiguous():
        return x
    return x.contiguous()


def channels_last(x: Tensor) -> Tensor:
    """``x`` in channels_last memory (itself if it already is)."""
    return x.contiguous(memory_format=_CHANNELS_LAST)


class _ScalePool(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: Tensor, scale_kernels: Tensor) -> Tensor:
        ctx.save_for_backward(h, scale_kernels)
        with _labelled("scale_pool_forward"):
            return kernels().scale_pool_forward(h, scale_kernels)  # type: ignore[union-attr]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, scale_kernels = ctx.saved_tensors
        with _labelled("scale_pool_backward"):
            grad_h, grad_kernels = kernels().scale_pool_backward(  # type: ignore[union-attr]
                x, scale_kernels, grad, ctx.needs_input_grad[1]
            )
        grad_h = grad_h if ctx.needs_input_grad[0] else None
        return grad_h, grad_kernels.to(scale_kernels.dtype) if ctx.needs_input_grad[1] else None


def scale_pool(h: Tensor, scale_kernels: Tensor) -> Tensor:
    """phi's 4 pooled scale maps per (example, channel), shape (B, C, 4); ``h`` in
    :func:`kernel_layout`."""
    result: Tensor = _ScalePool.apply(h, scale_kernels)
    return result


class _Sampled(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        h: Tensor,
        noise_weights: Tensor,
        noise: Tensor | None,
        key: int,
        scale: Tensor,
        strength: float,
        clip: float | None,
    ) -> Tensor:
        with _labelled("sampled_forward"):
            out: Tensor = kernels().sampled_forward(  # type: ignore[union-attr]
                h, noise_weights, noise, key, scale, strength, clip or 0.0
            )
        # Only h (the host keeps it anyway) and the key: backward draws the noise again.
        ctx.save_for_backward(h, noise_weights, scale, noise)
        ctx.key, ctx.strength, ctx.clip = key, strength, clip or 0.0
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, noise_weights, scale, noise = ctx.saved_tensors
        with _labelled("sampled_backward"):
            grad_h, grad_scale, grad_weights = kernels().sampled_backward(  # type: ignore[union-attr]
                x,
                noise_weights,
                noise,
                ctx.key,
                scale,
                ctx.strength,
                ctx.clip,
                grad,
                ctx.needs_input_grad[1],
            )
        return (
            grad_h if ctx.needs_input_grad[0] else None,
            grad_weights.to(noise_weights.dtype) if ctx.needs_input_grad[1] else None,
            None,
            None,
            grad_scale.to(scale.dtype) if ctx.needs_input_grad[4] else None,
            None,
            None,
        )


def draw_key() -> int:
    """A 63-bit key for the kernels' noise from torch's default CPU generator, so that
    ``torch.manual_seed`` (and a saved and restored generator state) fixes the noise."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def standard_normal(h: Tensor, key: int) -> Tensor:
    """The noise :func:`sampled` draws under ``key`` for a map shaped like ``h`` (float32, in
    ``h``'s layout; a value's noise depends on its position, not on the layout): to give the
    PyTorch path the same numbers."""
    result: Tensor = kernels().standard_normal(h, key)  # type: ignore[union-attr]
    return result


def sampled(
    h: Tensor,
    noise_weights: Tensor,
    scale: Tensor,
    strength: Tensor,
    clip: float | None,
    noise: Tensor | None = None,
    key: int | None = None,
) -> Tensor:
    """``h * ((s * softplus(mu + noise) - 1) * c + 1)`` with ``mu = E2(relu(E1(h)))``, clamped
    from above at ``clip``; ``noise_weights`` are E1's and E2's four kernels, flattened (36).
    The noise is ``noise`` when given (channels_last, shaped like ``h``), else drawn in the
    kernels from ``key`` (default: :func:`draw_key`). ``h`` in :func:`kernel_layout`; the result
    in ``h``'s layout."""
    if noise is None and key is None:
        key = draw_key()
    result: Tensor = _Sampled.apply(h, noise_weights, noise, key or 0, scale, float(strength), clip)
    return result


def expectation(
    h: Tensor,
    noise_weights: Tensor,
    scale: Tensor,
    strength: Tensor,
    clip: float | None,
    slope: float,
    bump: float,
    width: float,
) -> Tensor:
    """The deterministic eval site, without autograd (the caller checks none is needed),
    clamped from above at ``clip`` unless it is ``None``; ``h`` in :func:`kernel_layout`, the
    result in ``h``'s layout."""
    c = float(strength)
    with _labelled("expectation_forward"):
        return kernels().expectation_forward(  # type: ignore[union-attr]
            h, noise_weights, scale.float() * c, 1.0 - c, clip or 0.0, slope, bump, width
        )
