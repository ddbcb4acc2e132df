"""Compatibility matrix: each model wrapped, one train step and one eval forward, expected sites.

``benchmarks/compat_matrix.py`` prints the README's table from the same list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import metaperturb


@dataclass(frozen=True)
class Case:
    library: str
    name: str
    sites: int
    size: int = 64
    channels: int = 3

    def build(self) -> nn.Module:
        if self.library == "torchvision":
            factory: Callable[..., nn.Module] = getattr(torchvision.models, self.name)
            return factory(weights=None, num_classes=5)
        return timm.create_model(self.name, pretrained=False, num_classes=5, in_chans=self.channels)


CASES = [
    Case("torchvision", "resnet18", 8),
    Case("torchvision", "resnet50", 16),
    Case("torchvision", "wide_resnet50_2", 16),
    Case("torchvision", "resnext50_32x4d", 16),
    Case("torchvision", "vgg11_bn", 8),
    Case("torchvision", "mobilenet_v2", 17),
    Case("torchvision", "mobilenet_v3_small", 11),
    Case("torchvision", "efficientnet_b0", 16),
    Case("torchvision", "convnext_tiny", 18),
    Case("torchvision", "regnet_y_400mf", 16),
    Case("torchvision", "densenet121", 58),
    Case("timm", "resnet18", 8),
    Case("timm", "resnet50d", 16),
    Case("timm", "efficientnet_b0", 16),
    Case("timm", "mobilenetv3_large_100", 15),
    Case("timm", "convnext_atto", 12),
    Case("timm", "regnetx_002", 13),
    Case("timm", "densenet121", 58),
    Case("timm", "vgg11_bn", 8),
    Case("metaperturb", "cifar_resnet20", 9, size=32),
    Case("metaperturb", "cifar_resnet44", 21, size=32),
    Case("metaperturb", "cifar_wrn_28_2", 12, size=32),
    Case("metaperturb", "conv4", 4, size=32, channels=1),
    Case("metaperturb", "conv6", 6, size=32, channels=1),
]


def exercise(case: Case) -> tuple[nn.Module, metaperturb.SitePlan]:
    """Wrap, train one step, evaluate once; returns the wrapped model and its plan."""
    torch.manual_seed(0)
    model = metaperturb.wrap(
        case.build(),
        phi=metaperturb.Perturbation(),
        input_size=(case.channels, case.size, case.size),
    )
    x = torch.randn(2, case.channels, case.size, case.size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    loss = F.cross_entropy(model(x), torch.tensor([0, 1]))
    loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert torch.isfinite(loss) and torch.isfinite(logits).all() and logits.shape == (2, 5)
    return model, metaperturb.inspect(model)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.library}-{c.name}")
def test_model_wraps_trains_and_evaluates(case: Case) -> None:
    model, plan = exercise(case)
    assert len(plan.sites) == case.sites
    controller = metaperturb.get_controller(model)
    assert all(state.running_mean.abs().sum() > 0 for state in controller.sites)  # every site fired
    metaperturb.unwrap(model)
    assert not any(k.startswith("metaperturb.") for k in model.state_dict())
