"""ImageNet-style timm networks adapted to 32 px inputs: ``cifar_resnet18`` and
``cifar_mobilenetv2_100``, registered with timm on import.

An ImageNet network divides its input by 32 before the head: at 32 px its last stage sees 1x1
maps and its first 8x8, so most of its blocks, and phi's sites after them, work on maps that
hold almost nothing spatial. The usual adaptation to CIFAR-sized images, kept here, removes the
downsampling at the network's input and leaves the stages as they are, for an overall stride
of 8 (4x4 maps at the last stage):

* ResNet-18: the 7x7 stride-2 stem convolution becomes 3x3 stride 1 and the max-pool goes;
* MobileNetV2: the stem convolution and the first block of the second stage take stride 1.

Everything else (blocks, widths, initialisation, head) is timm's own model, so the sites that
``wrap`` finds are the same blocks as in the ImageNet network. No pretrained weights exist for
these shapes.
"""

from __future__ import annotations

from typing import Any

import timm
from timm.models import generate_default_cfgs, register_model
from torch import nn

__all__ = ["cifar_mobilenetv2_100", "cifar_resnet18"]

#: By how much the adaptation divides each stage's reduction (two stride-2 steps removed).
_STRIDE_REMOVED = 4


def _cfg(first_conv: str, classifier: str) -> dict[str, Any]:
    return {
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (4, 4),
        "first_conv": first_conv,
        "classifier": classifier,
    }


default_cfgs = generate_default_cfgs(
    {
        "cifar_resnet18": _cfg("conv1", "fc"),
        "cifar_mobilenetv2_100": _cfg("conv_stem", "classifier"),
    }
)


def _imagenet_model(variant: str, name: str, pretrained: bool, **kwargs: Any) -> Any:
    if pretrained:
        raise RuntimeError(
            f"No pretrained weights exist for {variant!r} (its input layers differ from "
            f"{name!r}'s); create it with pretrained=False."
        )
    return timm.create_model(name, pretrained=False, **kwargs)


def _shrink_feature_info(model: nn.Module) -> None:
    """Keep timm's per-stage ``reduction`` true after the stem's strides are gone."""
    for info in getattr(model, "feature_info", []):
        info["reduction"] = max(1, info["reduction"] // _STRIDE_REMOVED)


@register_model
def cifar_resnet18(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm's ResNet-18 with a 3x3 stride-1 stem and no max-pool (11.2M parameters)."""
    model = _imagenet_model("cifar_resnet18", "resnet18", pretrained, **kwargs)
    stem = model.conv1
    model.conv1 = nn.Conv2d(stem.in_channels, stem.out_channels, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # timm's
    model.maxpool = nn.Identity()
    _shrink_feature_info(model)
    return model


@register_model
def cifar_mobilenetv2_100(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm's MobileNetV2 (width 1.0) with stride 1 in its stem and second stage (2.2M
    parameters)."""
    model = _imagenet_model("cifar_mobilenetv2_100", "mobilenetv2_100", pretrained, **kwargs)
    model.conv_stem.stride = (1, 1)
    model.blocks[1][0].conv_dw.stride = (1, 1)  # no residual there: its channels change
    _shrink_feature_info(model)
    return model
