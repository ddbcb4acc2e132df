"""phi's site as Triton kernels, for GPUs (opt-in: not yet timed on one).

Why: on a GPU the PyTorch path runs phi's shared-kernel convolutions through PyTorch's NCHW
depthwise kernel, 40% of a wrapped ResNet-50 step (``benchmarks/results/profile-cuda-*.txt``),
and every elementwise op as its own pass. A 3x3 kernel shared by every channel is a stencil
over each (image, channel) plane; here each kernel reads its planes once and does all its
arithmetic in registers:

1. ``hidden = relu(conv(h, self_1) + conv(mean_c h, mean_1))``;
2. ``mu = conv(hidden, self_2) + conv(mean_c hidden, mean_2)`` and, in the same pass, the gain
   and the product: ``E[softplus(N(mu, 1))]`` in eval, ``softplus(mu + noise)`` (Triton's
   Philox, keyed per call from torch's default generator) and the clamp in training;
3. backward (phi frozen): the direct term, the noise mean's and the channel scale's gradients in
   one pass, then the two equivariant ops' transposes; ``hidden`` and ``mu`` are recomputed and
   the noise drawn again, so a site keeps only its input.

The channel means and their single-channel convolutions (one plane per image) stay in PyTorch.
Values are computed in float32 whatever the input dtype and the result is cast once, so a
16-bit gain cannot overflow before the product (what :func:`metaperturb._kernels.saturating_cast`
guards on the PyTorch path). A trainable phi (meta-training) keeps the PyTorch path. Enabled by
``METAPERTURB_TRITON=1`` until a GPU benchmark shows it faster (``benchmarks/overhead.py``, the
"triton" column); on a CPU it runs only under Triton's interpreter (``TRITON_INTERPRET=1``),
which the tests use.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# NCHW or channels_last memory, as it is where it can be: what these kernels index too.
from ._native.autograd import kernel_layout

__all__ = ["expectation", "sampled", "scale_pool", "usable"]

#: (image planes, pixels) per program: small maps pack several planes into one program.
_BLOCK = 1024


try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels below are then never defined, and usable() says so
    triton = None
    warnings.warn(
        "METAPERTURB_TRITON=1 asks for metaperturb's Triton kernels, but Triton is not "
        "installed: the sites run in PyTorch ops. Install triton (it comes with PyTorch's CUDA "
        "wheels on Linux) or unset METAPERTURB_TRITON.",
        stacklevel=2,
    )

if triton is not None:

    @triton.jit
    def _tile(planes, channels, height, width, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr):
        """This program's BLOCK_P planes (column p) x BLOCK_S pixels (row s) of the
        (planes, height * width) grid: p, s, which are inside, and image b, row i, column j."""
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]
        s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)[None, :]
        valid = (p < planes) & (s < height * width)
        return p, s, valid, p // channels, s // width, s % width

    @triton.jit
    def _stencil(x, plane, i, j, height, width, sh, sw, k, valid):
        """sum over the 3x3 taps of k[t] * x[plane, i+di, j+dj], zero outside the plane."""
        total = tl.zeros(valid.shape, dtype=tl.float32)
        for t in tl.static_range(9):
            di = t // 3 - 1
            dj = t % 3 - 1
            r = i + di
            c = j + dj
            inside = valid & (r >= 0) & (r < height) & (c >= 0) & (c < width)
            value = tl.load(x + plane + r * sh + c * sw, mask=inside, other=0.0)
            total += tl.load(k + t) * value.to(tl.float32)
        return total

    @triton.jit
    def _hidden_kernel(
        x, shift, out, kernels, planes, channels, height, width,
        sb, sc, sh, sw, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        p, s, valid, b, i, j = _tile(planes, channels, height, width, BLOCK_P, BLOCK_S)
        plane = b * sb + (p % channels) * sc
        e = _stencil(x, plane, i, j, height, width, sh, sw, kernels, valid)
        e += tl.load(shift + b * height * width + s, mask=valid, other=0.0)
        tl.store(out + p * height * width + s, tl.maximum(e, 0.0), mask=valid)

    @triton.jit
    def _output_kernel(
        hidden, shift, x, out, kernels, gain, offset_ptr, slope, bump, width_factor, limit,
        planes, channels, height, width, sb, sc, sh, sw,
        CLAMP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        p, s, valid, b, i, j = _tile(planes, channels, height, width, BLOCK_P, BLOCK_S)
        mu = _stencil(hidden, p * height * width, i, j, height, width, width, 1, kernels, valid)
        mu += tl.load(shift + b * height * width + s, mask=valid, other=0.0)
        # E[softplus(N(mu, 1))] ~ softplus(slope * mu) / slope + bump * exp(-width * mu^2)
        a = slope * mu
        softplus = tl.maximum(a, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(a)))
        z = softplus / slope + bump * tl.exp(-width_factor * mu * mu)
        g = tl.load(gain + p % channels, mask=valid, other=0.0)
        where = b * sb + (p % channels) * sc + i * sh + j * sw
        h = tl.load(x + where, mask=valid, other=0.0).to(tl.float32)
        offset = tl.load(offset_ptr)
        y = h * (g * z + offset)
        if CLAMP:
            y = tl.minimum(y, limit)
        tl.store(out + where, y.to(out.dtype.element_ty), mask=valid)

    @triton.jit
    def _sample(
        hidden, shift, x, noise, seed, kernels, gain, offset, p, s, valid, b, i, j, where,
        channels, height, width, GIVEN: tl.constexpr,
    ):  # fmt: skip
        """a = mu + noise, z = softplus(a), h and the gain factor at the tile's values."""
        mu = _stencil(hidden, p * height * width, i, j, height, width, width, 1, kernels, valid)
        mu += tl.load(shift + b * height * width + s, mask=valid, other=0.0)
        if GIVEN:
            eps = tl.load(noise + where, mask=valid, other=0.0).to(tl.float32)
        else:  # a value's noise: Philox under the call's seed at its (plane, pixel) index
            eps = tl.randn(seed, p * height * width + s)
        a = mu + eps
        z = tl.maximum(a, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(a)))
        g = tl.load(gain + p % channels, mask=valid, other=0.0)
        h = tl.load(x + where, mask=valid, other=0.0).to(tl.float32)
        return a, z, h, g * z + offset

    @triton.jit
    def _sampled_kernel(
        hidden, shift, x, noise, seed, out, kernels, gain, offset_ptr, limit,
        planes, channels, height, width, sb, sc, sh, sw,
        GIVEN: tl.constexpr, CLAMP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        p, s, valid, b, i, j = _tile(planes, channels, height, width, BLOCK_P, BLOCK_S)
        where = b * sb + (p % channels) * sc + i * sh + j * sw
        _, _, h, factor = _sample(
            hidden, shift, x, noise, seed, kernels, gain, tl.load(offset_ptr), p, s, valid, b, i, j, where,
            channels, height, width, GIVEN,
        )  # fmt: skip
        y = h * factor
        if CLAMP:
            y = tl.minimum(y, limit)
        tl.store(out + where, y.to(out.dtype.element_ty), mask=valid)

    @triton.jit
    def _sampled_grad_kernel(
        hidden, shift, x, noise, seed, grad_out, grad_h, dmu, scale_partial, kernels, gain,
        scale, strength_ptr, offset_ptr, limit, planes, channels, height, width, sb, sc, sh, sw,
        GIVEN: tl.constexpr, CLAMP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        """The direct term of grad_h, the noise mean's gradient, and per-plane partial sums of
        the channel scale's gradient (reduced in a fixed order by the caller)."""
        p, s, valid, b, i, j = _tile(planes, channels, height, width, BLOCK_P, BLOCK_S)
        where = b * sb + (p % channels) * sc + i * sh + j * sw
        a, z, h, factor = _sample(
            hidden, shift, x, noise, seed, kernels, gain, tl.load(offset_ptr), p, s, valid, b, i, j, where,
            channels, height, width, GIVEN,
        )  # fmt: skip
        grad = tl.load(grad_out + where, mask=valid, other=0.0).to(tl.float32)
        if CLAMP:
            grad = tl.where(h * factor <= limit, grad, 0.0)
        tl.store(grad_h + where, (grad * factor).to(grad_h.dtype.element_ty), mask=valid)
        through_gain = tl.where(valid, grad * h * tl.load(strength_ptr), 0.0)
        partial = tl.sum(through_gain * z, axis=1)
        rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        tl.store(
            scale_partial + rows * tl.num_programs(1) + tl.program_id(1), partial,
            mask=rows < planes,
        )  # fmt: skip
        sc_value = tl.load(scale + p % channels, mask=valid, other=0.0)
        sigmoid = 1.0 / (1.0 + tl.exp(-a))
        tl.store(dmu + p * height * width + s, through_gain * sc_value * sigmoid, mask=valid)

    @triton.jit
    def _transpose_kernel(
        dy, shift, mask_by, out, kernels, planes, channels, height, width, sb, sc, sh, sw,
        MASK: tl.constexpr, ACCUMULATE: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        """The transpose of an equivariant op, ``conv(dy, rot(self)) + shift``, on plane-major
        ``dy``; zeroed where ``mask_by`` <= 0 (MASK), added into ``out`` (ACCUMULATE) or
        written, ``out`` with strides (sb, sc, sh, sw)."""
        p, s, valid, b, i, j = _tile(planes, channels, height, width, BLOCK_P, BLOCK_S)
        d = _stencil(dy, p * height * width, i, j, height, width, width, 1, kernels, valid)
        d += tl.load(shift + b * height * width + s, mask=valid, other=0.0)
        if MASK:
            kept = tl.load(mask_by + p * height * width + s, mask=valid, other=0.0)
            d = tl.where(kept > 0.0, d, 0.0)
        where = b * sb + (p % channels) * sc + i * sh + j * sw
        if ACCUMULATE:
            d += tl.load(out + where, mask=valid, other=0.0).to(tl.float32)
        tl.store(out + where, d.to(out.dtype.element_ty), mask=valid)

    @triton.jit
    def _scale_pool_kernel(
        x, kernels, partial, planes, channels, height, width, sb, sc, sh, sw,
        BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        """Per plane and pixel block, the sums of relu(conv(x, kernel_k)) for the 4 kernels."""
        p, _, valid, b, i, j = _tile(planes, channels, height, width, BLOCK_P, BLOCK_S)
        plane = b * sb + (p % channels) * sc
        rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        base = (rows * tl.num_programs(1) + tl.program_id(1)) * 4
        for k in tl.static_range(4):
            m = _stencil(x, plane, i, j, height, width, sh, sw, kernels + 9 * k, valid)
            total = tl.sum(tl.where(valid, tl.maximum(m, 0.0), 0.0), axis=1)
            tl.store(partial + base + k, total, mask=rows < planes)

    @triton.jit
    def _scale_pool_grad_kernel(
        x, kernels, grad, out, planes, channels, height, width, sb, sc, sh, sw,
        BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        """d/dx of the pooled maps: sum over k and taps t of K_k[t] * g_k where map_k > 0 at
        the pixel that tap reaches back to (each map recomputed there; g = grad / pixels)."""
        p, _, valid, b, i, j = _tile(planes, channels, height, width, BLOCK_P, BLOCK_S)
        plane = b * sb + (p % channels) * sc
        total = tl.zeros(valid.shape, dtype=tl.float32)
        for k in tl.static_range(4):
            g = tl.load(grad + p * 4 + k, mask=p < planes, other=0.0)
            for t in tl.static_range(9):
                # Output pixel q = (i - di, j - dj) read x at (i, j) through tap t.
                qi = i - (t // 3 - 1)
                qj = j - (t % 3 - 1)
                inside = valid & (qi >= 0) & (qi < height) & (qj >= 0) & (qj < width)
                m = _stencil(x, plane, qi, qj, height, width, sh, sw, kernels + 9 * k, inside)
                total += tl.where(inside & (m > 0.0), tl.load(kernels + 9 * k + t) * g, 0.0)
        where = plane + i * sh + j * sw
        tl.store(out + where, total.to(out.dtype.element_ty), mask=valid)


def usable(h: Tensor) -> bool:
    """A site's map (4-d, floating: the site checked) on a GPU, or on a CPU under Triton's
    interpreter; Triton importable; outside torch.compile and tracing."""
    interpreted = os.environ.get("TRITON_INTERPRET", "") == "1"
    return (
        (h.device.type == "cuda" or (interpreted and h.device.type == "cpu"))
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and triton is not None
    )


def _grid(planes: int, pixels: int) -> tuple[int, int, tuple[int, int]]:
    block_s = min(_BLOCK, 1 << max(0, (pixels - 1).bit_length()))
    block_p = _BLOCK // block_s
    return block_p, block_s, (-(-planes // block_p), -(-pixels // block_s))


def _like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` in ``x``'s memory layout (the kernels address both with ``x``'s strides)."""
    layout = (
        torch.channels_last
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )
    return t.contiguous(memory_format=layout)


def _shift(x: Tensor, kernel: Tensor, reduce: str = "mean") -> Tensor:
    """``conv(mean_c x, kernel)`` (or of the channel sum): one plane per image, float32 (autocast
    would make it 16-bit)."""
    with torch.autocast(x.device.type, enabled=False):
        pooled = x.float().mean(dim=1, keepdim=True) if reduce == "mean" else x.sum(1, True)
        return F.conv2d(pooled, kernel, padding=1).contiguous()


def _gain(scale: Tensor, strength: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per channel ``s * c``, the offset ``1 - c`` and ``c`` itself, on the device: the kernels
    read the strength from memory, since a Python number would wait for the GPU at each site."""
    c = strength.detach().float().reshape(1).to(scale.device)
    return (scale.detach().float() * c).contiguous(), (1.0 - c).contiguous(), c


class _Site:
    """Shapes, launch grid and weights of one site call, and its first pass (``hidden``)."""

    def __init__(self, h: Tensor, noise_weights: Tensor | None = None) -> None:
        self.h = h
        batch, channels, height, width = h.shape
        if noise_weights is not None:
            self.weights = noise_weights.detach().float().reshape(4, 1, 3, 3)
        self.planes, self.pixels = batch * channels, height * width
        self.block_p, self.block_s, self.grid = _grid(self.planes, self.pixels)
        self.sizes = (self.planes, channels, height, width, *h.stride())
        self.blocks = {"BLOCK_P": self.block_p, "BLOCK_S": self.block_s}

    def kernel(self, k: int, rotated: bool = False) -> Tensor:
        w = self.weights[k, 0]
        return (w.flip(0, 1) if rotated else w).contiguous()

    def hidden(self) -> Tensor:
        """``relu(E1(h))``, float32, plane-major."""
        hidden = torch.empty(self.h.shape, device=self.h.device, dtype=torch.float32)
        _hidden_kernel[self.grid](
            self.h, _shift(self.h, self.weights[1:2]), hidden, self.kernel(0), *self.sizes,
            **self.blocks,
        )  # fmt: skip
        return hidden


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
    """The eval site in expectation mode, without autograd, clamped from above at ``clip``
    unless it is ``None``: ``noise_weights`` are E1's and E2's four 3x3 kernels flattened (36
    numbers, :meth:`Perturbation.noise_kernels`); the result has ``h``'s dtype and memory
    layout."""
    site = _Site(kernel_layout(h), noise_weights)
    gain, offset, _ = _gain(scale, strength)
    hidden = site.hidden()
    out = torch.empty_like(site.h)
    _output_kernel[site.grid](
        hidden, _shift(hidden, site.weights[3:4]), site.h, out, site.kernel(2), gain, offset,
        slope, bump, width, clip or 0.0, *site.sizes, CLAMP=clip is not None, **site.blocks,
    )  # fmt: skip
    return out


class _Sampled(torch.autograd.Function):
    """The sampled site with phi frozen: gradients to ``h`` and to the channel scale.

    Keeps ``h`` (which the host keeps anyway) and the seed; backward recomputes ``hidden`` and
    ``mu`` and draws the same noise again."""

    @staticmethod
    def forward(
        ctx: Any,
        h: Tensor,
        noise_weights: Tensor,
        scale: Tensor,
        strength: Tensor,
        clip: float | None,
        noise: Tensor | None,
        seed: int,
    ) -> Tensor:
        site = _Site(h, noise_weights)
        given = _like(noise.to(h.dtype), h) if noise is not None else h
        gain, offset, _ = _gain(scale, strength)
        hidden = site.hidden()
        out = torch.empty_like(h)
        _sampled_kernel[site.grid](
            hidden, _shift(hidden, site.weights[3:4]), h, given, seed, out, site.kernel(2), gain,
            offset, clip or 0.0, *site.sizes, GIVEN=noise is not None, CLAMP=clip is not None,
            **site.blocks,
        )  # fmt: skip
        ctx.save_for_backward(
            h, noise_weights, scale, strength, given if noise is not None else None
        )
        ctx.clip, ctx.seed = clip, seed
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        h, noise_weights, scale, strength, given = ctx.saved_tensors
        site = _Site(h, noise_weights)
        clip = ctx.clip
        grad_out = _like(grad_out, h)
        scale32 = scale.detach().float().contiguous()
        gain, offset, c = _gain(scale, strength)
        hidden = site.hidden()
        grad_h = torch.empty_like(h)
        dmu = torch.empty(h.shape, device=h.device, dtype=torch.float32)
        partial = torch.empty(site.planes, site.grid[1], device=h.device, dtype=torch.float32)
        _sampled_grad_kernel[site.grid](
            hidden, _shift(hidden, site.weights[3:4]), h, h if given is None else given,
            ctx.seed, grad_out, grad_h, dmu, partial, site.kernel(2), gain, scale32, c, offset,
            clip or 0.0, *site.sizes, GIVEN=given is not None,
            CLAMP=clip is not None, **site.blocks,
        )  # fmt: skip
        channels = h.shape[1]
        # dhidden = E2^T(dmu) where hidden > 0, then grad_h += E1^T(dhidden).
        plane_major = (site.planes, channels, *h.shape[2:], *dmu.stride())
        dhidden = torch.empty_like(dmu)
        _transpose_kernel[site.grid](
            dmu, _shift(dmu, site.weights[3:4].flip(2, 3), "sum") / channels, hidden, dhidden,
            site.kernel(2, rotated=True), *plane_major, MASK=True, ACCUMULATE=False,
            **site.blocks,
        )  # fmt: skip
        _transpose_kernel[site.grid](
            dhidden, _shift(dhidden, site.weights[1:2].flip(2, 3), "sum") / channels, hidden,
            grad_h, site.kernel(0, rotated=True), *site.sizes, MASK=False, ACCUMULATE=True,
            **site.blocks,
        )  # fmt: skip
        grad_scale = partial.view(h.shape[0], channels, -1).sum(dim=(0, 2)).to(scale.dtype)
        return grad_h, None, grad_scale, None, None, None, None


def sampled(
    h: Tensor,
    noise_weights: Tensor,
    scale: Tensor,
    strength: Tensor,
    clip: float | None,
    noise: Tensor | None = None,
) -> Tensor:
    """``h * ((s * softplus(mu + noise) - 1) * c + 1)``, clamped from above at ``clip``, with
    ``mu = E2(relu(E1(h)))`` and phi frozen (no gradient to its weights). The noise is
    ``noise`` when given, else Triton's Philox under a seed drawn from torch's default
    generator (so ``torch.manual_seed`` fixes it)."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    result: Tensor = _Sampled.apply(
        kernel_layout(h), noise_weights, scale, strength, clip, noise, seed
    )
    return result


class _ScalePool(torch.autograd.Function):
    """phi's 4 pooled scale maps per (example, channel), (B, C, 4) in float32, with phi frozen;
    keeps only ``h``, and backward recomputes each map where it needs its sign."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, kernels: Tensor) -> Tensor:
        site = _Site(h)
        flat = kernels.detach().float().reshape(-1).contiguous()
        partial = torch.empty(site.planes, site.grid[1], 4, device=h.device, dtype=torch.float32)
        _scale_pool_kernel[site.grid](h, flat, partial, *site.sizes, **site.blocks)
        ctx.save_for_backward(h, flat)
        return partial.sum(dim=1).view(*h.shape[:2], 4) / site.pixels

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        h, flat = ctx.saved_tensors
        site = _Site(h)
        per_value = (grad.float() / site.pixels).contiguous()
        grad_h = torch.empty_like(h)
        _scale_pool_grad_kernel[site.grid](h, flat, per_value, grad_h, *site.sizes, **site.blocks)
        return grad_h, None


def scale_pool(h: Tensor, kernels: Tensor) -> Tensor:
    """``mean over pixels of relu(conv(h[b, c], kernels[k]))``, shape (B, C, 4), phi frozen
    (no gradient to ``kernels``)."""
    result: Tensor = _ScalePool.apply(kernel_layout(h), kernels)
    return result
