"""CIFAR ResNets (He et al., 2016) and Wide ResNets (Zagoruyko & Komodakis, 2016), timm-registered.

timm ships ImageNet-style networks whose 7x7 stride-2 stem and max-pool throw away most of a
32x32 image, so the small-image baselines used in regularization papers live here instead. They
are registered with timm so that ``timm.create_model("cifar_resnet20", num_classes=...)`` works
after ``import metaperturb.models``, and they expose timm's classifier API (``forward_features``,
``forward_head``, ``reset_classifier``, ...) so the rest of the package can treat them like any
timm model.

Each residual block is its own module (``BasicBlock`` / ``PreActBlock``) and every stage is an
``nn.Sequential`` of blocks, so code that walks the module tree (hooks, perturbation insertion,
gradient checkpointing) sees one module per block and never mistakes the stem for a block.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from torch import Tensor, nn

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "PooledClassifier",
    "PreActBlock",
    "WideResNet",
    "cifar_resnet20",
    "cifar_resnet44",
    "cifar_wrn_28_2",
    "init_weights",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def init_weights(module: nn.Module) -> None:
    """Initialise convs with Kaiming-normal (fan-out, ReLU) and BatchNorm to identity.

    Fan-out Kaiming keeps the backward signal variance constant through ReLU networks, which is
    what lets these BN networks train from scratch without warm-up; BN starts as the identity so
    the residual branches begin at their natural scale. Linear layers keep PyTorch's default.

    Args:
        module: Module whose submodules are initialised in place.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PooledClassifier(nn.Module):
    """Shared timm-style head for the package's small CNNs: global average pool, dropout, linear.

    Subclasses build their body and implement ``forward_features``; this base supplies the
    classifier API timm users and timm's training scripts expect, so every model here can be
    swapped for a timm model without special cases.

    Args:
        num_features: Channels of the final feature map (input width of ``fc``).
        num_classes: Number of logits; 0 replaces ``fc`` by ``nn.Identity`` (feature extractor).
        drop_rate: Dropout probability applied to the pooled features before ``fc``.
    """

    def __init__(self, num_features: int, num_classes: int, drop_rate: float) -> None:
        super().__init__()
        self.num_features = num_features
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.fc: nn.Module = self._make_fc(num_classes)

    def _make_fc(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _run_blocks(self, blocks: nn.Sequential, x: Tensor, flatten: bool) -> Tensor:
        """Run ``blocks``, one checkpoint per block when grad checkpointing is on and training.

        Args:
            blocks: The blocks, or (``flatten=True``) a sequence of stages of blocks.
            x: Input feature map.
            flatten: Whether ``blocks`` holds stages that must be flattened into blocks.

        Returns:
            The output feature map.
        """
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            return checkpoint_seq(blocks, x, flatten=flatten)
        return blocks(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """Return the final (unpooled) feature map; implemented by subclasses."""
        raise NotImplementedError

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool the feature map and apply the classifier.

        Args:
            x: Feature map from ``forward_features``, shape ``(N, num_features, H, W)``.
            pre_logits: Return the pooled (and dropped-out) features instead of logits.

        Returns:
            ``(N, num_features)`` features if ``pre_logits`` else ``(N, num_classes)`` logits.
        """
        x = x.mean(dim=(2, 3))
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        """Compute logits for a batch of images ``(N, in_chans, H, W)``."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """Return the classifier module (``fc``)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace ``fc`` with a freshly initialised one for ``num_classes`` outputs.

        Args:
            num_classes: New number of classes; 0 removes the classifier.
            global_pool: Accepted for timm compatibility; only ``"avg"`` (or None) is supported.

        Raises:
            ValueError: If a pooling type other than average pooling is requested.
        """
        if global_pool not in (None, "avg"):
            raise ValueError(f"Only global_pool='avg' is supported, got {global_pool!r}.")
        self.num_classes = num_classes
        self.fc = self._make_fc(num_classes)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory: recompute each block's activations during backward.

        Only takes effect in training mode. Note that BatchNorm layers inside checkpointed blocks
        run their forward twice per step, so their running statistics are updated twice.

        Args:
            enable: Turn checkpointing on (True) or off (False).
        """
        self.grad_checkpointing = enable


class BasicBlock(nn.Module):
    """Post-activation residual block of He et al. (2016): two 3x3 conv-BN pairs plus a shortcut.

    When the block changes resolution or width the shortcut is a 1x1 conv + BN projection (the
    paper's option B), so every block has the same structure whatever the stage.

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        stride: Stride of the first conv (2 to halve the resolution).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        # Activation modules (not F.relu) so that a hook can reach the residual sum before the
        # last one: metaperturb.wrap(..., placement="before_activation").
        self.act1 = nn.ReLU()
        self.act2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs)
            )

    def forward(self, x: Tensor) -> Tensor:
        """Return ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class CifarResNet(PooledClassifier):
    """ResNet-(6n+2) for 32x32 images (He et al., 2016, Sec. 4.2).

    A 3x3 16-channel stem, then three stages of ``n`` ``BasicBlock``s at 16/32/64 channels and
    32/16/8 px (for 32 px input), global average pooling and a linear classifier.

    Args:
        depth: Network depth; must be ``6n + 2`` (20 -> n=3, 44 -> n=7).
        num_classes: Number of logits.
        in_chans: Input image channels.
        drop_rate: Dropout before the classifier.
    """

    def __init__(
        self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0
    ) -> None:
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}.")
        widths = (16, 32, 64)
        super().__init__(num_features=widths[-1], num_classes=num_classes, drop_rate=drop_rate)
        n = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        in_chs = widths[0]
        for i, width in enumerate(widths):
            blocks = [
                BasicBlock(in_chs if j == 0 else width, width, stride=2 if i > 0 and j == 0 else 1)
                for j in range(n)
            ]
            stages.append(nn.Sequential(*blocks))
            in_chs = width
        self.stages = nn.Sequential(*stages)
        init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """Return the last stage's feature map, ``(N, 64, H/4, W/4)``."""
        return self._run_blocks(self.stages, self.stem(x), flatten=True)


class PreActBlock(nn.Module):
    """Pre-activation wide residual block (BN-ReLU-conv twice) of Zagoruyko & Komodakis (2016).

    The projection shortcut (1x1 conv, no BN) is applied to the already normalised and activated
    input, as in the authors' reference code, so the identity path stays un-normalised only when
    the shape is unchanged.

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        stride: Stride of the first conv (2 to halve the resolution).
        drop_rate: Dropout between the two convs (the paper's in-block dropout).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Return ``conv2(dropout(relu(bn2(conv1(relu(bn1(x))))))) + shortcut``."""
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = F.relu(self.bn2(self.conv1(out)))
        if self.drop_rate > 0.0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


class WideResNet(PooledClassifier):
    """WRN-depth-k for 32x32 images (Zagoruyko & Komodakis, 2016).

    A 3x3 16-channel conv stem, three stages of ``(depth - 4) / 6`` ``PreActBlock``s at
    ``16k/32k/64k`` channels, a final BN + ReLU (pre-activation blocks leave their output
    un-normalised), global average pooling and a linear classifier.

    Args:
        depth: Network depth; must be ``6n + 4`` (28 -> 4 blocks per stage).
        widen_factor: Channel multiplier ``k``.
        num_classes: Number of logits.
        in_chans: Input image channels.
        drop_rate: Dropout before the classifier (timm's meaning of ``drop_rate``).
        block_drop_rate: Dropout inside every block (the paper's dropout, e.g. 0.3).
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 2,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        block_drop_rate: float = 0.0,
    ) -> None:
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"Wide ResNet depth must be 6n + 4 with n >= 1, got {depth}.")
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        super().__init__(num_features=widths[-1], num_classes=num_classes, drop_rate=drop_rate)
        n = (depth - 4) // 6
        stem_chs = 16
        self.stem = nn.Conv2d(in_chans, stem_chs, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        in_chs = stem_chs
        for i, width in enumerate(widths):
            blocks = [
                PreActBlock(
                    in_chs if j == 0 else width,
                    width,
                    stride=2 if i > 0 and j == 0 else 1,
                    drop_rate=block_drop_rate,
                )
                for j in range(n)
            ]
            stages.append(nn.Sequential(*blocks))
            in_chs = width
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(widths[-1])
        init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """Return the normalised, activated last feature map, ``(N, 64k, H/4, W/4)``."""
        x = self._run_blocks(self.stages, self.stem(x), flatten=True)
        return F.relu(self.norm(x))


def _cfg(first_conv: str) -> dict[str, Any]:
    """timm pretrained cfg for an untrained CIFAR-10-sized model (no weights are distributed)."""
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": first_conv,
        "classifier": "fc",
    }


# Must be defined before the ``@register_model`` functions: timm reads it at registration time.
default_cfgs = generate_default_cfgs(
    {
        "cifar_resnet20": _cfg("stem.0"),
        "cifar_resnet44": _cfg("stem.0"),
        "cifar_wrn_28_2": _cfg("stem"),
    }
)


def _check_no_pretrained(variant: str, pretrained: bool) -> None:
    """Fail loudly rather than let timm silently fall back to random init."""
    if pretrained:
        raise RuntimeError(
            f"No pretrained weights exist for {variant!r}; create it with pretrained=False "
            "(optionally passing checkpoint_path=... to timm.create_model to load your own)."
        )


def _create_resnet(variant: str, pretrained: bool, **kwargs: Any) -> CifarResNet:
    _check_no_pretrained(variant, pretrained)
    return build_model_with_cfg(CifarResNet, variant, pretrained, **kwargs)


def _create_wrn(variant: str, pretrained: bool, **kwargs: Any) -> WideResNet:
    _check_no_pretrained(variant, pretrained)
    return build_model_with_cfg(WideResNet, variant, pretrained, **kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for CIFAR (n=3, 0.27M parameters with 10 classes)."""
    return _create_resnet("cifar_resnet20", pretrained, **dict(kwargs, depth=20))


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-44 for CIFAR (n=7, 0.66M parameters with 10 classes)."""
    return _create_resnet("cifar_resnet44", pretrained, **dict(kwargs, depth=44))


@register_model
def cifar_wrn_28_2(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """Wide ResNet-28-2 for CIFAR (1.47M parameters with 10 classes)."""
    return _create_wrn("cifar_wrn_28_2", pretrained, **dict(kwargs, depth=28, widen_factor=2))
