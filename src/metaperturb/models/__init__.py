"""Small CIFAR / few-shot CNNs, registered with timm on import.

Importing this package registers ``cifar_resnet20``, ``cifar_resnet44``, ``cifar_wrn_28_2``,
``conv4`` and ``conv6``, and timm's ResNet-18 and MobileNetV2 adapted to 32 px inputs
(``cifar_resnet18``, ``cifar_mobilenetv2_100``), so that ``timm.create_model(name,
num_classes=..., in_chans=...)`` finds them; ``timm.list_models("cifar_*")`` lists the CIFAR
ones.
"""

from __future__ import annotations

from .cifar_resnet import (
    BasicBlock,
    CifarResNet,
    PooledClassifier,
    PreActBlock,
    WideResNet,
    cifar_resnet20,
    cifar_resnet44,
    cifar_wrn_28_2,
)
from .convnet import ConvNet, ConvUnit, conv4, conv6
from .small_input import cifar_mobilenetv2_100, cifar_resnet18

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "ConvNet",
    "ConvUnit",
    "PooledClassifier",
    "PreActBlock",
    "WideResNet",
    "cifar_mobilenetv2_100",
    "cifar_resnet18",
    "cifar_resnet20",
    "cifar_resnet44",
    "cifar_wrn_28_2",
    "conv4",
    "conv6",
]
