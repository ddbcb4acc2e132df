"""Tests for the timm-registered CIFAR / few-shot models in ``metaperturb.models``."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import timm
import torch
import torch.utils.checkpoint
from torch import nn

import metaperturb.models as mpm

__all__: list[str] = []

MODEL_NAMES = ["cifar_resnet20", "cifar_resnet44", "cifar_wrn_28_2", "conv4", "conv6"]

# Hand-computed parameter counts for num_classes=10, in_chans=3 (bias-free convs):
#   ResNet-20:  stem 3*16*9 + 32 = 464; stage1 3 * (2*16*16*9 + 64) = 14_016;
#               stage2 (16*32*9 + 32*32*9 + 128 + 16*32 + 64) + 2 * (2*32*32*9 + 128) = 51_648;
#               stage3 (32*64*9 + 64*64*9 + 256 + 32*64 + 128) + 2 * (2*64*64*9 + 256) = 205_696;
#               fc 64*10 + 10 = 650  ->  272_474.
#   ResNet-44:  same with 7 blocks per stage: 464 + 32_704 + 125_888 + 501_632 + 650 = 661_338.
#   WRN-28-2:   stem 3*16*9 = 432; stage1 (32 + 16*32*9 + 64 + 32*32*9 + 16*32) + 3 * 18_560
#               = 70_112; stage2 57_536 + 3 * 73_984 = 279_488; stage3 229_760 + 3 * 295_424
#               = 1_116_032; final BN 256; fc 128*10 + 10 = 1_290  ->  1_467_610.
#   Conv4:      (3*64*9 + 128) + 3 * (64*64*9 + 128) + 650 = 113_482; Conv6 adds 2 * 36_992.
PARAM_COUNTS = {
    "cifar_resnet20": 272_474,
    "cifar_resnet44": 661_338,
    "cifar_wrn_28_2": 1_467_610,
    "conv4": 113_482,
    "conv6": 187_466,
}
# (stem conv output channels, num_features) used to derive counts for other heads / in_chans.
STEM_AND_FEATURES = {
    "cifar_resnet20": (16, 64),
    "cifar_resnet44": (16, 64),
    "cifar_wrn_28_2": (16, 128),
    "conv4": (64, 64),
    "conv6": (64, 64),
}
NUM_BLOCKS = {
    "cifar_resnet20": 9,
    "cifar_resnet44": 21,
    "cifar_wrn_28_2": 12,
    "conv4": 4,
    "conv6": 6,
}
BLOCK_TYPES = (mpm.BasicBlock, mpm.PreActBlock, mpm.ConvUnit)


def _create(name: str, **kwargs: Any) -> Any:
    """Create through timm's registry (typed ``Any``: timm only promises an ``nn.Module``)."""
    return timm.create_model(name, **kwargs)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registered_with_timm() -> None:
    assert set(timm.list_models("cifar_*")) == {
        "cifar_mobilenetv2_100",
        "cifar_resnet18",
        "cifar_resnet20",
        "cifar_resnet44",
        "cifar_wrn_28_2",
    }
    assert set(timm.list_models("conv[46]")) == {"conv4", "conv6"}
    assert not set(timm.list_models(pretrained=True)) & set(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("size", [32, 28])
def test_logits_shape(name: str, in_chans: int, size: int) -> None:
    model = _create(name, num_classes=7, in_chans=in_chans).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_chans, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_param_counts(name: str) -> None:
    assert _num_params(_create(name)) == PARAM_COUNTS[name]
    # 7 classes and 1 input channel remove 3 rows of fc and 2 input planes of the stem conv.
    stem_chs, num_features = STEM_AND_FEATURES[name]
    expected = PARAM_COUNTS[name] - 3 * (num_features + 1) - 2 * stem_chs * 9
    assert _num_params(_create(name, num_classes=7, in_chans=1)) == expected


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_default_cfg_and_no_pretrained(name: str) -> None:
    model = _create(name)
    assert model.num_classes == 10
    assert model.default_cfg is model.pretrained_cfg
    assert tuple(model.pretrained_cfg["input_size"]) == (3, 32, 32)
    assert model.pretrained_cfg["num_classes"] == 10
    assert not model.pretrained_cfg.get("url")
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        _create(name, pretrained=True)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_structure(name: str) -> None:
    model = _create(name)
    blocks = [m for m in model.modules() if isinstance(m, BLOCK_TYPES)]
    assert len(blocks) == NUM_BLOCKS[name]
    stem = getattr(model, "stem", None)
    if stem is not None:
        assert not any(isinstance(m, BLOCK_TYPES) for m in stem.modules())
    stages = model.stages if hasattr(model, "stages") else [model.blocks]
    for stage in stages:
        assert isinstance(stage, nn.Sequential)
        assert all(isinstance(b, BLOCK_TYPES) for b in stage)
    assert isinstance(model.fc, nn.Linear)
    assert model.get_classifier() is model.fc
    relus = [m for _, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.ReLU)]
    assert len({id(m) for m in relus}) == len(relus), "a ReLU module is reused"


def test_init() -> None:
    model = _create("cifar_resnet20")
    conv = model.stages[2][1].conv2
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.05)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_head_api(name: str) -> None:
    model = _create(name, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape[:2] == (2, model.num_features)
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
        torch.testing.assert_close(model.forward_head(feats), model(x))
        model.reset_classifier(5)
        assert model.num_classes == 5 and model(x).shape == (2, 5)
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_grad_checkpointing_matches(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs: dict[str, Any] = {"num_classes": 7, "drop_rate": 0.2}
    if name.startswith("cifar_wrn"):
        kwargs["block_drop_rate"] = 0.3  # checkpointing must replay the same dropout masks
    torch.manual_seed(0)
    plain = _create(name, **kwargs).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(4, 3, 28, 28)
    target = torch.randint(0, 7, (4,))

    calls = 0
    original = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(*args, **kw)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)

    results = []
    for model in (plain, ckpt):
        torch.manual_seed(1)
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        nn.functional.cross_entropy(out, target).backward()
        assert xi.grad is not None
        results.append((out.detach(), xi.grad))

    assert calls == NUM_BLOCKS[name], "checkpoint_seq should wrap every block once"
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    for (pname, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None, pname
        assert p.grad.abs().sum() > 0, pname
        torch.testing.assert_close(p.grad, q.grad, msg=pname)


@pytest.mark.parametrize(
    ("name", "imagenet_name", "sites"),
    [("cifar_resnet18", "resnet18", 8), ("cifar_mobilenetv2_100", "mobilenetv2_100", 17)],
)
def test_imagenet_models_adapted_to_32px_keep_4x4_maps_and_timms_blocks(
    name: str, imagenet_name: str, sites: int
) -> None:
    """At 32 px the adapted network's last stage sees 4x4 maps (the ImageNet one: 1x1), and
    only the input layers differ: ResNet-18's stem is 3x3 instead of 7x7, MobileNetV2 keeps
    every parameter."""
    import metaperturb

    adapted = _create(name, num_classes=10, in_chans=1)
    imagenet = _create(imagenet_name, num_classes=10, in_chans=1)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert adapted.forward_features(x).shape[-2:] == (4, 4)
        assert imagenet.forward_features(x).shape[-2:] == (1, 1)
        assert adapted(x).shape == (2, 10)
    stem_difference = 64 * 1 * (7 * 7 - 3 * 3) if name == "cifar_resnet18" else 0
    assert _num_params(adapted) == _num_params(imagenet) - stem_difference
    assert [info["reduction"] for info in adapted.feature_info][-1] == 8
    wrapped = metaperturb.wrap(adapted, input_size=(1, 32, 32))
    assert len(metaperturb.get_controller(wrapped).site_names) == sites
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        _create(name, pretrained=True)
