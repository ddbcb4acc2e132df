"""The deterministic eval site as two Triton kernels, for GPUs (opt-in, not yet measured there).

Why: on a GPU the PyTorch path runs phi's shared-kernel convolutions through PyTorch's NCHW
depthwise kernel, 40% of a wrapped ResNet-50 step (``benchmarks/results/profile-cuda-*.txt``),
and every elementwise op as its own pass. A 3x3 kernel shared by every channel is a stencil
over each (image, channel) plane; here each kernel reads its planes once and does all its
arithmetic in registers:

1. ``hidden = relu(conv(h, self_1) + conv(mean_c h, mean_1))``;
2. ``mu = conv(hidden, self_2) + conv(mean_c hidden, mean_2)`` and, in the same pass,
   ``out = h * (gain_c * E[softplus(N(mu, 1))] + offset)``.

The channel means and their single-channel convolutions (one plane per image) stay in PyTorch.
Values are computed in float32 whatever the input dtype and the result is cast once, so a
16-bit gain cannot overflow before the product (what :func:`metaperturb._kernels.saturating_cast`
guards on the PyTorch path). Enabled by ``METAPERTURB_TRITON=1`` until a GPU benchmark shows it
faster than the PyTorch path (``benchmarks/overhead.py``); on a CPU it runs only under Triton's
interpreter (``TRITON_INTERPRET=1``), which the tests use.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["expectation", "usable"]

#: (image planes, pixels) per program: small maps pack several planes into one program.
_BLOCK = 1024


try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels below are then never defined, and usable() says so
    triton = None

if triton is not None:

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
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]
        s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)[None, :]
        valid = (p < planes) & (s < height * width)
        b = p // channels
        i = s // width
        j = s % width
        plane = b * sb + (p % channels) * sc
        e = _stencil(x, plane, i, j, height, width, sh, sw, kernels, valid)
        e += tl.load(shift + b * height * width + s, mask=valid, other=0.0)
        tl.store(out + p * height * width + s, tl.maximum(e, 0.0), mask=valid)

    @triton.jit
    def _output_kernel(
        hidden, shift, x, out, kernels, gain, offset, slope, bump, width_factor,
        planes, channels, height, width, sb, sc, sh, sw,
        BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]
        s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)[None, :]
        valid = (p < planes) & (s < height * width)
        b = p // channels
        i = s // width
        j = s % width
        mu = _stencil(hidden, p * height * width, i, j, height, width, width, 1, kernels, valid)
        mu += tl.load(shift + b * height * width + s, mask=valid, other=0.0)
        # E[softplus(N(mu, 1))] ~ softplus(slope * mu) / slope + bump * exp(-width * mu^2)
        a = slope * mu
        softplus = tl.maximum(a, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(a)))
        z = softplus / slope + bump * tl.exp(-width_factor * mu * mu)
        g = tl.load(gain + p % channels, mask=valid, other=0.0)
        where = b * sb + (p % channels) * sc + i * sh + j * sw
        h = tl.load(x + where, mask=valid, other=0.0).to(tl.float32)
        tl.store(out + where, (h * (g * z + offset)).to(out.dtype.element_ty), mask=valid)


def usable(h: Tensor) -> bool:
    """A 4-d floating map on a GPU (or on a CPU under Triton's interpreter), Triton importable,
    outside torch.compile and tracing."""
    interpreted = os.environ.get("TRITON_INTERPRET", "") == "1"
    return (
        h.dim() == 4
        and h.is_floating_point()
        and (h.device.type == "cuda" or (interpreted and h.device.type == "cpu"))
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and triton is not None
    )


def _grid(planes: int, pixels: int) -> tuple[int, int, tuple[int, int]]:
    block_s = min(_BLOCK, 1 << max(0, (pixels - 1).bit_length()))
    block_p = _BLOCK // block_s
    return block_p, block_s, (-(-planes // block_p), -(-pixels // block_s))


def expectation(
    h: Tensor,
    noise_weights: Tensor,
    scale: Tensor,
    strength: Tensor,
    slope: float,
    bump: float,
    width: float,
) -> Tensor:
    """The eval site in expectation mode, without autograd: ``noise_weights`` are E1's and
    E2's four 3x3 kernels flattened (36 numbers, :meth:`Perturbation.noise_kernels`); the
    result has ``h``'s dtype and memory layout."""
    if not (h.is_contiguous() or h.is_contiguous(memory_format=torch.channels_last)):
        h = h.contiguous()  # the output is made like h: both must be dense
    batch, channels, height, width_ = h.shape
    weights = noise_weights.detach().float().reshape(4, 1, 3, 3)
    c = float(strength)
    gain = (scale.detach().float() * c).contiguous()
    planes, pixels = batch * channels, height * width_
    block_p, block_s, grid = _grid(planes, pixels)
    sb, sc, sh, sw = h.stride()

    def mean_shift(x: Tensor, kernel: Tensor) -> Tensor:
        # conv(mean_c x, kernel): one plane per image, in float32 (autocast would make it 16-bit).
        with torch.autocast(x.device.type, enabled=False):
            return F.conv2d(x.float().mean(dim=1, keepdim=True), kernel, padding=1).contiguous()

    hidden = torch.empty(batch, channels, height, width_, device=h.device, dtype=torch.float32)
    _hidden_kernel[grid](
        h, mean_shift(h, weights[1:2]), hidden, weights[0].contiguous(),
        planes, channels, height, width_, sb, sc, sh, sw, BLOCK_P=block_p, BLOCK_S=block_s,
    )  # fmt: skip
    out = torch.empty_like(h)
    _output_kernel[grid](
        hidden, mean_shift(hidden, weights[3:4]), h, out, weights[2].contiguous(), gain,
        1.0 - c, slope, bump, width, planes, channels, height, width_, sb, sc, sh, sw,
        BLOCK_P=block_p, BLOCK_S=block_s,
    )  # fmt: skip
    return out
