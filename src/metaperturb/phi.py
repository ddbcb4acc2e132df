"""The perturbation function phi: 82 parameters shared by every site of every network.

phi maps a feature map ``h`` of shape (B, C, H, W) to a multiplicative perturbation
``g = s * z``: ``z`` is input-dependent noise (``softplus`` of a Gaussian whose mean comes from
two channel-equivariant 3x3 ops) and ``s`` in [0, 1]^C is a per-channel scale computed from
batch statistics. phi holds only the weights; the per-site running statistics live in
:class:`metaperturb.site.SiteState`, so one phi can serve many sites and many networks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._kernels import relu_mean, softplus

__all__ = [
    "DEFAULT_CONV_FORMS",
    "NUM_SCALE_FEATURES",
    "ChannelEquivariantConv",
    "ConvForm",
    "Perturbation",
    "PerturbationConfig",
    "expected_softplus",
    "shared_kernel_conv",
]

#: Length of the per-channel descriptor fed to the scale head: mean (4) and variance (4) of the
#: pooled scale maps over the batch, then ``C / channel_norm`` and ``H / spatial_norm``.
NUM_SCALE_FEATURES = 10
_SCALE_MAPS = 4
# Bound on the scale head's inputs: any finite statistic below it passes unchanged.
_FEATURE_LIMIT = 1e30


@dataclass
class PerturbationConfig:
    """What phi needs besides its weights. Saved as ``config.json`` next to the weights."""

    #: Divisor of the channel descriptor ``C / channel_norm``. ``None``: the widest site of the
    #: host (so the descriptor lies in (0, 1] for any architecture).
    channel_norm: float | None = None
    #: Divisor of the spatial descriptor ``H / spatial_norm``. ``None``: the height of the image
    #: that entered the host, recorded on every forward pass.
    spatial_norm: float | None = None
    #: Upper clamp of the perturbed features (the authors' k = 100); ``None`` disables it.
    clip: float | None = 100.0
    #: Whether ``clip`` also holds in eval mode (expectation and sample). The authors clamp in
    #: training only; without a clamp at test time the noise mean, linear in the features, lets a
    #: deep network's activations grow as their square from site to site until they overflow
    #: (ResNet-44 on s-CIFAR10: README, Evaluation). ``False`` evaluates as the authors do.
    clip_in_eval: bool = True
    #: Momentum of the running mean/variance of the scale statistics (as in BatchNorm).
    momentum: float = 0.1
    #: Where this phi was meta-trained to act, and where :func:`metaperturb.wrap` puts it unless
    #: told otherwise: ``"output"`` (each block's output) or ``"before_activation"`` (the input
    #: of a block's final activation module, the authors' ResNet placement).
    placement: str = "output"
    #: Free-form provenance, e.g. ``{"source_dataset": "tiny-imagenet-200-32px"}``.
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("channel_norm", "spatial_norm", "clip"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"PerturbationConfig.{name} must be a positive number or None, got {value!r}."
                )
        if not isinstance(self.clip_in_eval, bool):
            raise TypeError(
                f"PerturbationConfig.clip_in_eval must be True or False, got {self.clip_in_eval!r}."
            )
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(
                f"PerturbationConfig.momentum must lie in [0, 1], got {self.momentum!r}."
            )
        if self.placement not in ("output", "before_activation"):
            raise ValueError(
                "PerturbationConfig.placement must be 'output' or 'before_activation', got "
                f"{self.placement!r}."
            )

    def active_clip(self, training: bool) -> float | None:
        """The upper clamp a forward pass applies: ``clip`` in training, and in eval too
        unless ``clip_in_eval`` is off (``None``: no clamp)."""
        return self.clip if training or self.clip_in_eval else None

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data (``config.json``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PerturbationConfig:
        """Read :meth:`to_dict`'s data; unknown keys are an error (a newer file), not dropped."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"Unknown phi config keys {sorted(unknown)}; known keys are {sorted(known)}. "
                "The file may come from a newer metaperturb: upgrade the package."
            )
        return cls(**data)


def _identity(weight: Tensor) -> Tensor:
    return weight


#: How a 3x3 kernel shared by every channel runs over a (B, C, H, W) map. ``"depthwise"``: one
#: convolution with ``groups=C`` (the kernel repeated C times); ``"batched"``: one single-channel
#: convolution over the (B*C, 1, H, W) view; ``"grouped"`` (scale maps only): one grouped
#: convolution with 4 outputs per channel. The same function every way; which is fastest depends
#: on the backend (``benchmarks/conv_forms.py`` measures them).
ConvForm = Literal["depthwise", "batched", "grouped"]
#: Per device type: (noise-mean convolutions, scale maps). Measured on this project's machines
#: (README, Performance); other device types use the CPU's.
DEFAULT_CONV_FORMS: dict[str, tuple[ConvForm, ConvForm]] = {
    "cpu": ("depthwise", "depthwise"),
    "cuda": ("depthwise", "grouped"),
}


def shared_kernel_conv(x: Tensor, kernels: Tensor, form: ConvForm) -> Tensor:
    """Each of the K kernels ``(K, 1, 3, 3)`` over each channel of ``x`` on its own, padding 1.

    Returns (B, C*K, H, W), channel-major: output ``c*K + k`` is kernel ``k`` over channel ``c``.
    """
    if form not in get_args(ConvForm):
        raise ValueError(f"unknown convolution form {form!r}; use one of {get_args(ConvForm)}.")
    batch, channels, height, width = x.shape
    count = kernels.shape[0]
    if form == "batched":
        flat = x.reshape(batch * channels, 1, height, width)
        return F.conv2d(flat, kernels, padding=1).view(batch, channels * count, height, width)
    if count == 1:  # "depthwise" and "grouped" are the same convolution
        return F.conv2d(x, kernels.expand(channels, 1, 3, 3), padding=1, groups=channels)
    if form == "grouped":
        return F.conv2d(x, kernels.repeat(channels, 1, 1, 1), padding=1, groups=channels)
    # Several depthwise kernels: the caller runs them one at a time (scale_maps pools each map
    # before the next exists).
    raise ValueError("the depthwise form takes one kernel at a time; call it once per kernel.")


class ChannelEquivariantConv(nn.Module):
    """A 3x3 op on C channels that commutes with any permutation of the channels.

    Equal to a dense C x C x 3 x 3 convolution with weight ``lam * I + gam * 11^T / C``: one kernel
    ``lam`` applied to each channel on its own, plus one kernel ``gam`` applied to the channel mean
    and added to every channel (Deep Sets). 18 weights whatever C is.
    """

    def __init__(self) -> None:
        super().__init__()
        self.self_weight = nn.Parameter(torch.empty(1, 1, 3, 3))
        self.mean_weight = nn.Parameter(torch.empty(1, 1, 3, 3))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small random kernels (std 0.01): the op starts near 0 for any input."""
        nn.init.normal_(self.self_weight, 0.0, 0.01)
        nn.init.normal_(self.mean_weight, 0.0, 0.01)

    def forward(
        self,
        x: Tensor,
        weight: Callable[[Tensor], Tensor] = _identity,
        form: ConvForm = "depthwise",
    ) -> Tensor:
        """Apply the op; ``weight`` maps each parameter before use (phi passes its freeze guard),
        ``form`` says how the per-channel kernel runs (:func:`shared_kernel_conv`)."""
        own = shared_kernel_conv(x, weight(self.self_weight).to(x.dtype), form)
        mean_kernel = weight(self.mean_weight).to(x.dtype)
        shared = F.conv2d(x.mean(dim=1, keepdim=True), mean_kernel, padding=1)
        return own + shared

    def dense_weight(self, channels: int) -> Tensor:
        """The equivalent C x C x 3 x 3 convolution weight (for tests and inspection)."""
        eye = torch.eye(channels, dtype=self.self_weight.dtype, device=self.self_weight.device)
        ones = torch.full_like(eye, 1.0 / channels)
        return (
            eye[:, :, None, None] * self.self_weight[0, 0]
            + ones[:, :, None, None] * self.mean_weight[0, 0]
        )


# E[softplus(mu + eps)], eps ~ N(0, 1), is smooth and close to a rescaled softplus; a Gaussian bump
# absorbs the rest. Constants fitted (minimax over mu in [-12, 12]) against an 80-point
# Gauss-Hermite rule; the error is below 3.5e-4 everywhere (0.05% of z at mu = 0).
_EXPECTATION_SLOPE = 0.919
_EXPECTATION_BUMP = 0.0515
_EXPECTATION_WIDTH = 1.0 / (2.0 * 2.375)


def expected_softplus(mu: Tensor) -> Tensor:
    """``E[softplus(a)]`` for ``a ~ N(mu, 1)``: the mean of phi's noise ``z``, elementwise.

    No closed form exists; this approximation (two transcendental functions, within 3.5e-4 of
    the exact value for every ``mu``) makes the deterministic eval mode cost one pass.
    """
    # softplus(k mu) / k is softplus with beta = k: one pass.
    bump = torch.exp(mu.square().mul_(-_EXPECTATION_WIDTH))
    return torch.add(softplus(mu, beta=_EXPECTATION_SLOPE), bump, alpha=_EXPECTATION_BUMP)


class Perturbation(nn.Module):
    """phi: the 82-parameter perturbation function of MetaPerturb (Ryu et al., NeurIPS 2020).

    Parameters (82 in all): two :class:`ChannelEquivariantConv` for the noise mean (36), four
    3x3 kernels shared by every channel for the scale statistics (36), and the 10 weights of a
    linear map to the channel scale (10). Plain parameters rather than ``nn.Conv2d`` /
    ``nn.Linear`` submodules, so a host's ``for m in model.modules(): if isinstance(m, nn.Linear)``
    initialisation loop cannot overwrite them. phi holds no per-site state: running statistics
    live in :class:`metaperturb.site.SiteState`, one per site.

    While :attr:`frozen` is true (the default after :func:`metaperturb.wrap`), every forward
    uses detached weights, so phi cannot learn even if a host calls ``requires_grad_(True)`` on
    the whole model.

    Example:
        >>> phi = Perturbation()
        >>> sum(p.numel() for p in phi.parameters())
        82
    """

    def __init__(self, config: PerturbationConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else PerturbationConfig()
        self.noise_in = ChannelEquivariantConv()
        self.noise_out = ChannelEquivariantConv()
        self.scale_kernels = nn.Parameter(torch.empty(_SCALE_MAPS, 1, 3, 3))
        self.scale_weight = nn.Parameter(torch.empty(1, NUM_SCALE_FEATURES))
        self.frozen = False
        #: (noise-mean, scale-maps) convolution forms; ``None``: the device's default
        #: (:data:`DEFAULT_CONV_FORMS`). A speed setting: every form computes the same function.
        self.conv_forms: tuple[ConvForm, ConvForm] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A fresh, untrained phi: every weight drawn from N(0, 0.01), as the authors initialise
        it, so ``mu`` is near 0 (``z ~ softplus(N(0, 1))``) and ``s`` near 0.5."""
        self.noise_in.reset_parameters()
        self.noise_out.reset_parameters()
        nn.init.normal_(self.scale_kernels, 0.0, 0.01)
        nn.init.normal_(self.scale_weight, 0.0, 0.01)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike[str], *, revision: str | None = None, **kwargs: Any
    ) -> Perturbation:
        """Load a phi from a Hub repo id, a folder or a ``.safetensors`` file (strictly, never
        unpickling); see :func:`metaperturb.hub.load_phi` for the keyword arguments."""
        from .hub import load_phi

        return load_phi(name_or_path, revision=revision, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Write ``model.safetensors``, ``config.json`` and a model card to ``save_directory``."""
        from .hub import save_pretrained

        return save_pretrained(self, save_directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Publish this phi to the Hugging Face Hub; returns the commit URL."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def fingerprint(self) -> str:
        """SHA-256 of the 82 numbers: tells two phi apart whatever their files or names."""
        from ._serialization import fingerprint

        return fingerprint(self)

    def freeze(self, frozen: bool = True) -> Perturbation:
        """Stop (or restart) learning: sets ``requires_grad`` and the detach guard together."""
        self.frozen = frozen
        self.requires_grad_(not frozen)
        return self

    def _weight(self, weight: Tensor) -> Tensor:
        return weight.detach() if self.frozen else weight

    def _forms(self, device: torch.device) -> tuple[ConvForm, ConvForm]:
        if self.conv_forms is not None:
            return self.conv_forms
        return DEFAULT_CONV_FORMS.get(device.type, DEFAULT_CONV_FORMS["cpu"])

    def noise_mean(self, h: Tensor) -> Tensor:
        """``mu = E2(relu(E1(h)))``, same shape as ``h``."""
        form = self._forms(h.device)[0]
        hidden = F.relu(self.noise_in(h, self._weight, form))
        return self.noise_out(hidden, self._weight, form)

    def noise_kernels(self) -> Tensor:
        """E1's and E2's kernels (self, mean, self, mean), flattened to 36 numbers: the form the
        fused CPU kernels take."""
        kernels = (
            self.noise_in.self_weight,
            self.noise_in.mean_weight,
            self.noise_out.self_weight,
            self.noise_out.mean_weight,
        )
        return torch.cat([self._weight(k).reshape(-1) for k in kernels])

    def scale_maps(self, h: Tensor) -> Tensor:
        """The 4 pooled scale maps of each (example, channel): shape (B, C, 4).

        The same four 3x3 kernels run over every channel on its own, then relu and global
        average pooling.
        """
        batch, channels = h.shape[:2]
        kernels = self._weight(self.scale_kernels).to(h.dtype)
        form = self._forms(h.device)[1]
        if form == "depthwise":
            # Pooled one kernel at a time: the four full-size maps never exist together. (On a
            # CPU, oneDNN's grouped convolution with 4 outputs per group is several times slower
            # than four depthwise ones.)
            pooled = [
                relu_mean(shared_kernel_conv(h, kernel, "depthwise")) for kernel in kernels.split(1)
            ]
            return torch.stack(pooled, dim=2)
        maps = shared_kernel_conv(h, kernels, form)
        return relu_mean(maps).view(batch, channels, _SCALE_MAPS)

    def channel_scale(
        self, mean: Tensor, var: Tensor, channel_ratio: float, spatial_ratio: Tensor
    ) -> Tensor:
        """``s`` in [0, 1]^C from the (C, 4) statistics and the two layer descriptors.

        The 10 features of channel c are ``[mean_c (4), var_c (4), channel_ratio, spatial_ratio]``.
        """
        channels = mean.shape[0]
        weight = self._weight(self.scale_weight)
        descriptors = torch.stack(
            [
                mean.new_full((), channel_ratio),
                spatial_ratio.to(device=mean.device, dtype=mean.dtype),
            ]
        )
        features = torch.cat([mean, var, descriptors.expand(channels, 2)], dim=1)
        # In at least fp32 and as an elementwise product (which autocast leaves alone): a 16-bit
        # matmul overflows once a variance passes 65504 (features of a few hundred), and inf - inf
        # would make s NaN. The clamp keeps an overflowed (infinite) statistic from doing the same;
        # it never changes a finite one below 1e30, where the sigmoid saturated long before.
        wide = features.to(torch.promote_types(features.dtype, torch.float32))
        logits = (wide.clamp(-_FEATURE_LIMIT, _FEATURE_LIMIT) * weight).sum(dim=1)
        return torch.sigmoid(logits).to(weight.dtype)

    def extra_repr(self) -> str:
        fields = {k: v for k, v in self.config.to_dict().items() if k != "metadata"}
        return ", ".join(f"{k}={v}" for k, v in fields.items()) + f", frozen={self.frozen}"
