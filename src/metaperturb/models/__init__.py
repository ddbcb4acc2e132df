"""Small CIFAR / few-shot CNNs, registered with timm on import.

Importing this package registers ``cifar_resnet20``, ``cifar_resnet44``, ``cifar_wrn_28_2``,
``conv4`` and ``conv6`` so that ``timm.create_model(name, num_classes=..., in_chans=...)`` finds
them; ``timm.list_models("cifar_*")`` lists the CIFAR ones.
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

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "ConvNet",
    "ConvUnit",
    "PooledClassifier",
    "PreActBlock",
    "WideResNet",
    "cifar_resnet20",
    "cifar_resnet44",
    "cifar_wrn_28_2",
    "conv4",
    "conv6",
]
