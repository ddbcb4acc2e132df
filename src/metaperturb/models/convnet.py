"""The few-shot "ConvN" backbones (Conv4 / Conv6), timm-registered.

Conv4 (Vinyals et al., 2016; Snell et al., 2017; Finn et al., 2017) is the standard small backbone
of few-shot and meta-learning work, where MetaPerturb-style regularizers are meta-trained and
evaluated. Each unit is 3x3 conv (64 channels) + BatchNorm + ReLU, followed by a 2x2 max-pool for
the first four units; Conv6 adds two unpooled units. The original networks flatten the final
feature map, which ties the head to one input size; here the map is globally average-pooled
instead so that any input of at least 16 px works with the same ``fc`` (for 84 px inputs and
four pools the map is 5x5, so this is a deliberate departure from flatten-based Conv4 heads).

There is no separate stem: all ``N`` units are ``ConvUnit`` blocks in ``self.blocks`` (an
``nn.Sequential``), so a per-block regularizer or hook covers the first unit too.
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from .cifar_resnet import CIFAR10_MEAN, CIFAR10_STD, PooledClassifier, init_weights

__all__ = ["ConvNet", "ConvUnit", "conv4", "conv6"]


class ConvUnit(nn.Module):
    """One ConvN unit: 3x3 conv, BatchNorm, ReLU and an optional 2x2 max-pool.

    The conv has no bias because the BatchNorm right after it subtracts the mean, which would
    cancel any bias exactly (this saves 64 parameters per unit versus bias=True variants).

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        pool: Whether to halve the resolution with a 2x2 max-pool after the ReLU.
    """

    def __init__(self, in_chs: int, out_chs: int = 64, pool: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        # A module, not F.relu, so that a forward hook can sit on either side of it: MetaPerturb's
        # "output" placement perturbs the non-negative unit output (as on a ResNet block's), its
        # "before_activation" placement the signed BatchNorm output (METHOD.md's conv+BN).
        self.act = nn.ReLU()
        self.pool: nn.Module = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Return ``pool(relu(bn(conv(x))))``."""
        return self.pool(self.act(self.bn(self.conv(x))))


class ConvNet(PooledClassifier):
    """ConvN backbone: ``depth`` ``ConvUnit``s, the first ``num_pooled`` of them pooled.

    Args:
        depth: Number of conv units (4 for Conv4, 6 for Conv6).
        num_pooled: How many of the leading units end with a 2x2 max-pool.
        width: Channels of every unit.
        num_classes: Number of logits.
        in_chans: Input image channels.
        drop_rate: Dropout before the classifier.
    """

    def __init__(
        self,
        depth: int = 4,
        num_pooled: int = 4,
        width: int = 64,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        if depth < 1 or not 0 <= num_pooled <= depth:
            raise ValueError(
                f"Need depth >= 1 and 0 <= num_pooled <= depth, got {depth}, {num_pooled}."
            )
        super().__init__(num_features=width, num_classes=num_classes, drop_rate=drop_rate)
        self.blocks = nn.Sequential(
            *(
                ConvUnit(in_chans if i == 0 else width, width, pool=i < num_pooled)
                for i in range(depth)
            )
        )
        init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """Return the last unit's feature map, ``(N, width, H / 2**num_pooled, ...)``."""
        return self._run_blocks(self.blocks, x, flatten=False)


def _cfg() -> dict[str, Any]:
    """timm pretrained cfg for an untrained CIFAR-10-sized model (no weights are distributed)."""
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": "blocks.0.conv",
        "classifier": "fc",
    }


# Must be defined before the ``@register_model`` functions: timm reads it at registration time.
default_cfgs = generate_default_cfgs({"conv4": _cfg(), "conv6": _cfg()})


def _create(variant: str, pretrained: bool, **kwargs: Any) -> ConvNet:
    if pretrained:
        raise RuntimeError(
            f"No pretrained weights exist for {variant!r}; create it with pretrained=False "
            "(optionally passing checkpoint_path=... to timm.create_model to load your own)."
        )
    return build_model_with_cfg(ConvNet, variant, pretrained, **kwargs)


@register_model
def conv4(pretrained: bool = False, **kwargs: Any) -> ConvNet:
    """Conv4: four pooled 64-channel units (113K parameters with 10 classes)."""
    return _create("conv4", pretrained, **dict(kwargs, depth=4, num_pooled=4))


@register_model
def conv6(pretrained: bool = False, **kwargs: Any) -> ConvNet:
    """Conv6: Conv4 plus two unpooled 64-channel units (187K parameters with 10 classes)."""
    return _create("conv6", pretrained, **dict(kwargs, depth=6, num_pooled=4))
