"""wrap / unwrap / inspect on small models written here, as a user would write them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import metaperturb
import metaperturb._native as native
from metaperturb import (
    AlreadyWrappedError,
    NoSitesError,
    NotWrappedError,
    Perturbation,
    StrengthScheduler,
)
from metaperturb.wrapper import get_controller


class MyBlock(nn.Module):
    """A user's own residual block: no class name the library could know."""

    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.a = nn.Conv2d(channels if stride == 1 else channels // 2, channels, 3, stride, 1)
        self.na = nn.BatchNorm2d(channels)
        self.b = nn.Conv2d(channels, channels, 3, 1, 1)
        self.nb = nn.BatchNorm2d(channels)
        self.skip = (
            nn.Identity()
            if stride == 1
            else nn.Sequential(
                nn.Conv2d(channels // 2, channels, 1, stride), nn.BatchNorm2d(channels)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.nb(self.b(F.relu(self.na(self.a(x)))))
        return F.relu(y + self.skip(x))


class MyResNet(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(MyBlock(8), MyBlock(8), MyBlock(16, stride=2), MyBlock(16))
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).mean((2, 3)))


class MyPlainNet(nn.Module):
    """Conv4-style, written with attributes and functional relu / pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.n2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.n1(self.c1(x))), 2)
        x = F.max_pool2d(F.relu(self.n2(self.c2(x))), 2)
        x = F.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))


def wrapped(model: nn.Module, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return metaperturb.wrap(model, phi=Perturbation(), input_size=(3, 16, 16), **kwargs)


def test_user_residual_blocks_are_found_stem_and_head_skipped() -> None:
    plan = metaperturb.inspect(MyResNet(), input_size=(3, 16, 16))
    assert [s.name for s in plan.sites] == ["body.0", "body.1", "body.2", "body.3"]
    assert [s.channels for s in plan.sites] == [8, 8, 16, 16]
    assert [(s.height, s.width) for s in plan.sites] == [(16, 16)] * 2 + [(8, 8)] * 2
    reasons = {s.name: s.reason for s in plan.skipped}
    assert reasons["stem"].startswith("stem")
    assert reasons["head"].startswith("head")
    text = str(plan)
    assert "body.2" in text and "MyBlock" in text and "stem:" in text


def test_plain_net_gets_a_site_after_each_conv_unit() -> None:
    plan = metaperturb.inspect(MyPlainNet(), input_size=(1, 16, 16))
    assert [s.name for s in plan.sites] == ["n1", "n2", "c3"]
    assert plan.sites[0].role == "conv unit"


def test_stage_strategy_and_explicit_names() -> None:
    plan = metaperturb.inspect(MyResNet(), sites="stage", input_size=(3, 16, 16))
    assert [s.name for s in plan.sites] == ["body.1", "body.3"]
    plan = metaperturb.inspect(MyResNet(), sites=["body.3", "stem"], input_size=(3, 16, 16))
    assert [s.name for s in plan.sites] == ["body.3", "stem"]
    with pytest.raises(NoSitesError, match="'nope': not a submodule"):
        metaperturb.inspect(MyResNet(), sites=["nope"], input_size=(3, 16, 16))
    with pytest.raises(NoSitesError, match="not a \\(B, C, H, W\\)"):
        metaperturb.inspect(MyResNet(), sites=["head"], input_size=(3, 16, 16))


def test_exclude_leaves_those_sites_alone_and_the_others_as_they_would_be() -> None:
    """The remedy a ClosedSiteWarning names: the sites left out get no hook, and the others see
    the same channel descriptor as when every site is wrapped (the widest site stays the norm,
    even when it is the one left out)."""
    full = get_controller(wrapped(MyResNet()))
    ratios = dict(zip(full.site_names, full.channel_ratios, strict=True))
    model = wrapped(MyResNet(), exclude=["body.2", "body.3"])  # both 16-channel sites
    controller = get_controller(model)
    assert controller.site_names == ["body.0", "body.1"]
    assert controller.channel_ratios == [ratios["body.0"], ratios["body.1"]] == [0.5, 0.5]
    assert not model.body[2]._forward_hooks and not model.body[3]._forward_hooks
    plan = str(metaperturb.inspect(model))
    assert "left out (exclude=): body.2, body.3" in plan
    metaperturb.unwrap(model)
    assert [s.name for s in metaperturb.inspect(model, input_size=(3, 16, 16)).sites] == [
        "body.0",
        "body.1",
        "body.2",
        "body.3",
    ]


def test_exclude_that_names_no_site_or_every_site_is_refused() -> None:
    with pytest.raises(NoSitesError, match=r"\['stem'\], which is not a site .* Its sites: \["):
        wrapped(MyResNet(), exclude=["stem"])
    with pytest.raises(NoSitesError, match="leaves no site"):
        wrapped(MyResNet(), exclude=["body.0", "body.1", "body.2", "body.3"])
    with pytest.raises(TypeError, match=r"exclude=\['body.3'\]"):
        wrapped(MyResNet(), exclude="body.3")
    model = MyResNet()
    with pytest.raises(NoSitesError):
        wrapped(model, exclude=["nope"])
    assert not metaperturb.is_wrapped(model)  # a refused wrap leaves the model as it was


def test_model_without_sites_raises_a_clear_error() -> None:
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(48, 10), nn.ReLU(), nn.Linear(10, 2))
    with pytest.raises(NoSitesError, match="no module after which phi can be applied"):
        metaperturb.wrap(mlp, phi=Perturbation(), input_size=(3, 4, 4))


def test_planning_input_the_model_rejects_says_to_pass_input_size() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 14 * 14, 2)
    )
    with pytest.raises(NoSitesError, match="input_size=\\(3, 32, 32\\)"):
        metaperturb.wrap(net, phi=Perturbation())


def test_wrap_keeps_host_keys_and_unwrap_restores_everything() -> None:
    model = MyResNet()
    keys = list(model.state_dict())
    before = copy.deepcopy(model.state_dict())
    wrapped(model)
    state = model.state_dict()
    assert [k for k in state if not k.startswith("metaperturb.")] == keys
    assert "metaperturb.sites.0.running_mean" in state and "metaperturb.phi.scale_weight" in state
    assert "metaperturb.input_height" not in state  # non-persistent: recorded on every forward
    model(torch.randn(2, 3, 16, 16))
    metaperturb.unwrap(model)
    assert list(model.state_dict()) == keys
    assert not hasattr(model, "metaperturb")
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert not model._load_state_dict_post_hooks
    # The host changed only through its own training (BN statistics), never through wrap.
    assert all(
        torch.equal(before[k], v)
        for k, v in model.state_dict().items()
        if "running" not in k and "num_batches" not in k
    )


def test_wrap_twice_and_unwrap_plain_are_errors() -> None:
    model = wrapped(MyResNet())
    with pytest.raises(AlreadyWrappedError, match="unwrap"):
        metaperturb.wrap(model, phi=Perturbation())
    with pytest.raises(NotWrappedError, match="wrap\\(model\\) first"):
        metaperturb.unwrap(MyResNet())


def test_wrapped_model_perturbs_in_training_and_disabled_restores_host() -> None:
    host = MyResNet()
    model = wrapped(copy.deepcopy(host))
    x = torch.randn(4, 3, 16, 16)
    host.train(), model.train()
    assert not torch.allclose(model(x), host(x))
    with metaperturb.disabled(model):
        torch.testing.assert_close(model(x), host(x))
    assert metaperturb.get_controller(model).enabled


def test_eval_modes_and_mc_predict() -> None:
    host = MyResNet()
    model = wrapped(copy.deepcopy(host))
    x = torch.randn(4, 3, 16, 16)
    model.train()
    for _ in range(3):
        model(x)
    host.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith("metaperturb.")}
    )
    model.eval(), host.eval()
    expectation = model(x)
    torch.testing.assert_close(model(x), expectation)  # deterministic
    metaperturb.set_eval_mode(model, "off")
    torch.testing.assert_close(model(x), host(x))
    metaperturb.set_eval_mode(model, "sample")
    assert not torch.equal(model(x), model(x))
    metaperturb.set_eval_mode(model, "expectation")
    model.train()
    model.stem[1].eval()  # a layer the user keeps frozen while training
    torch.manual_seed(7)
    probs = metaperturb.mc_predict(model, x, samples=5)
    assert model.training and metaperturb.get_controller(model).eval_mode == "expectation"
    assert not model.stem[1].training and model.body[0].na.training
    assert probs.shape == (4, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    # Five sampled passes in eval mode (running statistics), drawn one after another from the
    # same generator and averaged: not one pass, not the expectation, not batch statistics.
    model.eval()
    metaperturb.set_eval_mode(model, "sample")
    torch.manual_seed(7)
    with torch.no_grad():
        draws = torch.stack([model(x).softmax(dim=-1) for _ in range(5)])
    assert not torch.allclose(draws[0], draws[1], rtol=0, atol=1e-4)
    torch.testing.assert_close(probs, draws.mean(dim=0), rtol=0, atol=1e-6)
    metaperturb.set_eval_mode(model, "expectation")
    with torch.no_grad():
        one_pass = model(x).softmax(dim=-1)
    assert not torch.allclose(probs, one_pass, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="eval mode must be one of"):
        metaperturb.set_eval_mode(model, "mean")  # type: ignore[arg-type]


def test_frozen_phi_is_untouched_by_the_users_optimizer() -> None:
    model = wrapped(MyResNet())
    phi_before = copy.deepcopy(metaperturb.get_controller(model).phi.state_dict())
    host_before = model.head.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3])).backward()
        optimizer.step()
    phi_after = metaperturb.get_controller(model).phi.state_dict()
    assert all(torch.equal(phi_before[k], phi_after[k]) for k in phi_before)
    assert not torch.equal(model.head.weight, host_before)


def test_trainable_phi_gets_gradients() -> None:
    model = wrapped(MyResNet(), trainable=True)
    model(torch.randn(4, 3, 16, 16)).sum().backward()
    phi = metaperturb.get_controller(model).phi
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in phi.parameters())


def test_site_statistics_round_trip_through_the_hosts_state_dict() -> None:
    model = wrapped(MyResNet())
    model(torch.randn(4, 3, 16, 16))
    fresh = wrapped(MyResNet())
    fresh.load_state_dict(model.state_dict())
    for a, b in zip(
        metaperturb.get_controller(model).sites,
        metaperturb.get_controller(fresh).sites,
        strict=True,
    ):
        torch.testing.assert_close(a.running_mean, b.running_mean)
    assert metaperturb.get_controller(model).sites[0].running_mean.abs().sum() > 0


def test_a_plain_host_checkpoint_loads_strictly_into_a_wrapped_host() -> None:
    host = MyResNet()
    model = wrapped(MyResNet())
    result = model.load_state_dict(host.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(model.head.weight, host.head.weight)


def test_a_plain_checkpoint_loads_strictly_into_a_wrapped_backbone_inside_another_model() -> None:
    """The keys then carry the outer model's prefix (``backbone.metaperturb.…``)."""

    class Outer(nn.Module):
        def __init__(self, backbone: nn.Module) -> None:
            super().__init__()
            self.backbone = backbone

    plain = Outer(MyResNet())
    outer = Outer(wrapped(MyResNet()))
    result = outer.load_state_dict(plain.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(outer.backbone.head.weight, plain.backbone.head.weight)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*backbone\.head\.bias"):
        outer.load_state_dict(
            {k: v for k, v in plain.state_dict().items() if k != "backbone.head.bias"}
        )


def descriptors(model: nn.Module) -> list[tuple[int, int, float, float]]:
    """Record, per site call, the features' channels and height and the channel and spatial
    descriptors phi's scale is given: spies around the site function (the features) and
    ``phi.channel_scale`` (what phi itself receives, on the fused and the PyTorch path alike)."""
    controller = metaperturb.get_controller(model)
    heights: list[int] = []
    seen: list[tuple[int, int, float, float]] = []
    site_function, channel_scale = controller.site_function, controller.phi.channel_scale

    def site_spy(h: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        heights.append(h.shape[-2])
        return site_function(h, *args, **kwargs)

    def scale_spy(
        mean: torch.Tensor, var: torch.Tensor, channel_ratio: float, spatial_ratio: torch.Tensor
    ) -> torch.Tensor:
        seen.append((mean.shape[0], heights[-1], float(channel_ratio), float(spatial_ratio)))
        return channel_scale(mean, var, channel_ratio, spatial_ratio)

    controller.site_function = site_spy
    controller.phi.channel_scale = scale_spy  # type: ignore[method-assign]
    return seen


def test_the_spatial_descriptor_is_read_when_the_host_is_run_through_another_method() -> None:
    """Calling the stem and body directly (as timm's ``forward_features`` does) still records the
    input height, at the first layer, so phi sees the size it is given, not a stale one."""
    model = wrapped(MyResNet()).eval()
    controller = metaperturb.get_controller(model)
    assert controller.plan.stem == "stem.0"
    seen = descriptors(model)
    x = torch.randn(2, 3, 24, 24)
    features = model.body(model.stem(x))
    assert controller.input_height.item() == 24
    assert [(height, ratio) for _, height, _, ratio in seen] == [
        (24, 1.0),
        (24, 1.0),
        (12, 0.5),
        (12, 0.5),
    ]
    model(torch.randn(2, 3, 16, 16))
    seen.clear()
    torch.testing.assert_close(model.body(model.stem(x)), features)
    assert [ratio for *_, ratio in seen] == [1.0, 1.0, 0.5, 0.5]  # over 24 again, not 16


def test_a_host_whose_first_layer_does_not_take_the_image_has_no_stem_hook() -> None:
    class Resized(MyResNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(F.interpolate(x, scale_factor=0.5))

    model = wrapped(Resized())
    assert metaperturb.get_controller(model).plan.stem is None
    model(torch.randn(2, 3, 32, 32))
    assert metaperturb.get_controller(model).input_height.item() == 32  # the host's input


def test_spatial_descriptor_follows_the_input_size() -> None:
    """phi is told each site's height in this forward over the height of the image that entered
    it, and its channels over the widest site's. The stem has no padding, so the sites' heights
    are not proportional to the input's: a ratio kept from the planning pass (16 px), or the
    plan's site heights over this input's, would differ."""
    host = MyResNet()
    host.stem[0].padding = (0, 0)
    model = wrapped(host)
    controller = metaperturb.get_controller(model)
    assert [s.height for s in controller.plan.sites] == [14, 14, 7, 7]
    seen = descriptors(model)
    for size in (24, 16):
        seen.clear()
        model(torch.randn(2, 3, size, size))
        assert controller.input_height.item() == size
        heights = [size - 2] * 2 + [(size - 2) // 2] * 2
        assert [(channels, height) for channels, height, *_ in seen] == list(
            zip([8, 8, 16, 16], heights, strict=True)
        )
        assert [ratio for *_, ratio in seen] == pytest.approx([h / size for h in heights])
        assert [ratio for _, _, ratio, _ in seen] == [0.5, 0.5, 1.0, 1.0]
    assert controller.channel_ratios == [0.5, 0.5, 1.0, 1.0]


def test_fixed_norms_replace_the_input_height_and_the_widest_site() -> None:
    """``spatial_norm`` in phi's config makes the spatial descriptor ``H / spatial_norm``
    whatever the input's height; ``channel_norm=`` given to wrap makes the channel descriptor
    ``C / channel_norm`` (over phi's own, over the widest site)."""
    torch.manual_seed(0)
    phi = Perturbation(metaperturb.PerturbationConfig(spatial_norm=32, channel_norm=64))
    model = metaperturb.wrap(MyResNet(), phi=phi, input_size=(3, 16, 16), channel_norm=32)
    controller = metaperturb.get_controller(model)
    assert controller.channel_ratios == [0.25, 0.25, 0.5, 0.5]
    seen = descriptors(model)
    for size in (24, 16):
        seen.clear()
        model(torch.randn(2, 3, size, size))
        heights = [size, size, size // 2, size // 2]
        assert [height for _, height, _, _ in seen] == heights
        assert [ratio for *_, ratio in seen] == pytest.approx([h / 32 for h in heights])
        assert [ratio for _, _, ratio, _ in seen] == [0.25, 0.25, 0.5, 0.5]
    torch.manual_seed(0)
    own = metaperturb.wrap(MyResNet(), phi=copy.deepcopy(phi), input_size=(3, 16, 16))
    assert metaperturb.get_controller(own).channel_ratios == [0.125, 0.125, 0.25, 0.25]


def test_strength_scheduler_ramps_over_the_first_40_percent() -> None:
    model = wrapped(MyResNet())
    scheduler = StrengthScheduler(model, total_steps=100)
    controller = metaperturb.get_controller(model)
    assert controller.strength.item() == 0.0
    values = [scheduler.step() for _ in range(100)]
    assert values[19] == pytest.approx(0.5) and values[39] == 1.0 and values[-1] == 1.0
    resumed = StrengthScheduler(model, total_steps=100)
    resumed.load_state_dict({"last_step": 10, "total_steps": 100, "ramp_fraction": 0.4})
    assert controller.strength.item() == pytest.approx(0.25)
    assert metaperturb.linear_ramp(0, 10) == 0.0
    with pytest.raises(ValueError, match="strength must lie"):
        metaperturb.set_strength(model, 2.0)


def test_default_phi_is_not_faked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """wrap(model) without phi uses the phi* the package ships, number for number (not a freshly
    initialised stand-in); a package without the file says so instead of using a stand-in."""
    from safetensors.torch import load_file

    from metaperturb import hub

    shipped = hub.default_phi_path() / "model.safetensors"
    assert shipped.is_file(), f"this checkout ships phi* at {shipped}"
    torch.manual_seed(0)
    phi = metaperturb.get_controller(metaperturb.wrap(MyResNet(), input_size=(3, 16, 16))).phi
    direct = hub.load_phi(hub.default_phi_path())
    assert phi.fingerprint() == direct.fingerprint() and phi.config == direct.config
    assert phi.frozen
    state, tensors = phi.state_dict(), load_file(shipped)  # the file's numbers, read raw
    assert sorted(state) == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(state[name], tensor), name
    torch.manual_seed(0)
    fresh = Perturbation().state_dict()
    assert all(not torch.equal(state[name], fresh[name]) for name in fresh)
    # A fresh phi draws its 82 numbers from N(0, 0.01): none reaches 0.1 (10 sigma); phi*'s do.
    assert max(float(t.abs().max()) for t in state.values()) > 0.1
    monkeypatch.setattr(hub, "default_phi_path", lambda: tmp_path / "phi-star")
    with pytest.raises(metaperturb.DefaultPhiUnavailableError, match="phi="):
        metaperturb.wrap(MyResNet(), input_size=(3, 16, 16))


@pytest.mark.parametrize("kernels", [True, False], ids=["fused-kernels", "pytorch-ops"])
def test_memory_efficient_sites_give_the_same_step_with_less_saved_memory(
    kernels: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not kernels:
        monkeypatch.setattr(native, "usable", lambda *args: False)

    def step(memory_efficient: bool) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, int]:
        torch.manual_seed(0)
        model = wrapped(MyResNet(), memory_efficient=memory_efficient)
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        torch.manual_seed(3)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(torch.randn(4, 3, 16, 16))
        out.square().sum().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        running = metaperturb.get_controller(model).sites[0].running_mean.clone()
        return out, grads, running, sum(saved.values())

    out, grads, running, memory = step(False)
    out_lean, grads_lean, running_lean, memory_lean = step(True)
    torch.testing.assert_close(out_lean, out)
    for a, b in zip(grads_lean, grads, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(running_lean, running)  # updated once, not again in backward
    if kernels and native.usable(torch.zeros(1, 1, 1, 1), torch.float32):
        # The fused sites keep only their input already (the noise is drawn again in backward),
        # so checkpointing them saves at most the scale path's small tensors.
        assert memory_lean <= memory
    else:
        assert memory_lean < 0.8 * memory


class ActBlock(MyBlock):
    """MyBlock with its last ReLU a module, as timm writes its blocks (``act2``)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.nb(self.b(F.relu(self.na(self.a(x)))))
        return self.act(y + self.skip(x))


def phi_inputs(model: nn.Module) -> list[torch.Tensor]:
    """Record what phi receives at each site (a spy around the site function)."""
    controller = metaperturb.get_controller(model)
    seen: list[torch.Tensor] = []
    real = controller.site_function

    def spy(h: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(h.detach().clone())
        return real(h, *args, **kwargs)

    controller.site_function = spy
    return seen


def test_before_activation_places_phi_on_the_residual_sum() -> None:
    host = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), ActBlock(8), ActBlock(8), MyBlock(8), nn.Flatten()
    )
    plan = metaperturb.inspect(host, input_size=(3, 16, 16), placement="before_activation")
    assert [(s.name, s.hook) for s in plan.sites] == [
        ("1.act", "input"),
        ("2.act", "input"),
        ("3", "output"),  # F.relu: no module to hook before, so the block's output
    ]
    assert "no final activation module" in plan.sites[2].role
    model = wrapped(copy.deepcopy(host), placement="before_activation")
    seen = phi_inputs(model)
    model.train()
    x = torch.randn(4, 3, 16, 16)
    out = model(x)
    # phi saw the signed sum at the first two sites and the relu'd output at the third; the
    # block still ends in its relu.
    assert [bool((h < 0).any()) for h in seen] == [True, True, False]
    assert bool((out >= 0).all())
    out.sum().backward()  # the in-place ReLU after the site leaves autograd intact
    with metaperturb.disabled(model):
        torch.testing.assert_close(model(x), host.train()(x))
    metaperturb.unwrap(model)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


@pytest.mark.parametrize(("placement", "signed"), [("output", False), ("before_activation", True)])
def test_plain_conv_nets_take_either_placement(placement: str, signed: bool) -> None:
    """Conv4's units (conv, BN, ReLU, pool): phi after the ReLU by default, as on a ResNet
    block's output where phi* was meta-trained; on the signed BN output (METHOD.md's conv+BN)
    before it. Conv4 once applied F.relu, which left only the BN output to hook."""
    host = timm.create_model("conv4", num_classes=3)
    plan = metaperturb.inspect(host, input_size=(3, 32, 32), placement=placement)  # type: ignore[arg-type]
    assert [s.name for s in plan.sites] == [f"blocks.{i}.act" for i in range(4)]
    torch.manual_seed(0)
    model = metaperturb.wrap(host, phi=Perturbation(), input_size=(3, 32, 32), placement=placement)  # type: ignore[arg-type]
    seen = phi_inputs(model)
    model.train()(torch.randn(2, 3, 32, 32))
    assert [bool((h < 0).any()) for h in seen] == [signed] * 4


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_before_activation_gives_the_same_function_as_output_for_relu(
    memory_efficient: bool,
) -> None:
    """relu(h * g) = relu(h) * g for g > 0: with phi fed the same features the two placements
    compute the same network; here phi's input differs, so only shapes and finiteness match, but
    a phi that ignores its input (zero weights) gives identical outputs and gradients."""
    host = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ActBlock(8), ActBlock(8))
    outputs = []
    for placement in ("output", "before_activation"):
        phi = Perturbation()
        for parameter in phi.parameters():
            torch.nn.init.zeros_(parameter)
        model = metaperturb.wrap(
            copy.deepcopy(host),
            phi=phi,
            input_size=(3, 16, 16),
            placement=placement,
            memory_efficient=memory_efficient,
        )
        torch.manual_seed(1)
        x = torch.randn(4, 3, 16, 16, requires_grad=True)
        out = model.train()(x)
        out.square().sum().backward()
        outputs.append((out.detach(), x.grad))
    torch.testing.assert_close(outputs[0][0], outputs[1][0])
    torch.testing.assert_close(outputs[0][1], outputs[1][1])


def test_an_unknown_placement_is_refused() -> None:
    with pytest.raises(ValueError, match="placement must be one of"):
        metaperturb.inspect(MyResNet(), input_size=(3, 16, 16), placement="inside")  # type: ignore[arg-type]


def sequential_host() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip


def test_a_sequential_host_stays_a_sequence_of_its_own_layers() -> None:
    """len, indexing, slicing and replacing the head see the user's layers only, although the
    MetaPerturb state is a child module (it still travels with state_dict and .to())."""
    host = sequential_host()
    model = wrapped(copy.deepcopy(host))
    x = torch.randn(2, 3, 16, 16)
    assert isinstance(model, nn.Sequential) and repr(model).startswith("Sequential(")
    assert len(model) == 9 and isinstance(model[-1], nn.Linear)
    assert [type(m) for m in model] == [type(m) for m in host]
    assert model[:-1](x).shape == (2, 8)  # a feature extractor, as on the plain host
    with metaperturb.disabled(model):
        torch.testing.assert_close(model.train()(x), host.train()(x))
    assert any(k.startswith("metaperturb.") for k in model.state_dict())
    model[-1] = nn.Linear(8, 3)  # a new head for fine-tuning
    assert metaperturb.is_wrapped(model) and model(x).shape == (2, 3)
    model.append(nn.Softmax(dim=1))
    assert len(model) == 10 and "9" in dict(model.named_children())
    del model[-1]
    assert len(model) == 9 and metaperturb.is_wrapped(model)
    metaperturb.unwrap(model)
    assert type(model) is nn.Sequential and len(model) == 9


def test_a_wrapped_sequential_pickles_and_copies_as_a_wrapped_sequential() -> None:
    import io

    model = wrapped(sequential_host()).eval()
    x = torch.randn(2, 3, 16, 16)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    for other in (loaded, copy.deepcopy(model)):
        assert len(other) == 9 and metaperturb.is_wrapped(other)
        torch.testing.assert_close(other(x), model(x))
        metaperturb.unwrap(other)
        assert type(other) is nn.Sequential
    assert metaperturb.is_wrapped(model)


def test_one_phi_cannot_be_frozen_for_one_model_and_trainable_for_another() -> None:
    phi = Perturbation()
    learner = metaperturb.wrap(MyResNet(), phi=phi, input_size=(3, 16, 16), trainable=True)
    with pytest.raises(ValueError, match=r"already attached trainable.*copy\.deepcopy"):
        metaperturb.wrap(MyResNet(), phi=phi, input_size=(3, 16, 16))
    assert not phi.frozen
    metaperturb.wrap(MyResNet(), phi=copy.deepcopy(phi), input_size=(3, 16, 16))
    metaperturb.wrap(MyResNet(), phi=phi, input_size=(3, 16, 16), trainable=True)  # shared, alike
    metaperturb.unwrap(learner)


def test_bad_channel_norm_and_repeated_sites_are_refused() -> None:
    for value in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="channel_norm must be a positive number"):
            wrapped(MyResNet(), channel_norm=value)
    with pytest.raises(ValueError, match=r"sites lists \['body.0'\] more than once"):
        wrapped(MyResNet(), sites=["body.0", "body.1", "body.0"])


@pytest.mark.parametrize("kernels", [True, False], ids=["fused-kernels", "pytorch-ops"])
def test_the_strength_may_change_between_forward_and_backward(
    kernels: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scheduler stepped before ``loss.backward()`` must neither break the backward pass nor
    change it: the gradient is that of the forward it follows, at that forward's strength. The
    PyTorch ops save the strength tensor for backward, which the scheduler then fills in place;
    the fused kernels take its value."""
    if not kernels:
        monkeypatch.setattr(native, "usable", lambda *args: False)

    def gradients(steps_before: int, step_between: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = wrapped(MyResNet()).train()
        scheduler = StrengthScheduler(model, total_steps=10)  # full strength after 4 steps
        for _ in range(steps_before):
            scheduler.step()
        torch.manual_seed(1)  # the same input and noise in every run
        loss = model(torch.randn(2, 3, 16, 16)).square().sum()
        if step_between:
            assert scheduler.step() == 0.5
        loss.backward()
        return [p.grad for p in model.parameters() if p.grad is not None]

    expected = gradients(1, step_between=False)  # strength 0.25
    stepped = gradients(1, step_between=True)
    assert len(stepped) == len(expected) > 0
    for a, b in zip(stepped, expected, strict=True):
        torch.testing.assert_close(a, b)
    # The comparison can tell the two strengths apart: at 0.5 the gradient differs.
    later = gradients(2, step_between=False)
    assert not all(torch.allclose(a, b) for a, b in zip(later, expected, strict=True))


def test_before_activation_on_torchvision_perturbs_the_last_call_of_a_shared_relu() -> None:
    """torchvision's BasicBlock runs one ``relu`` module twice; phi goes before the second call
    only, once per forward of the block, in copies too."""
    torchvision = pytest.importorskip("torchvision")
    host = torchvision.models.resnet18(num_classes=5)
    model = metaperturb.wrap(
        copy.deepcopy(host),
        phi=Perturbation(),
        input_size=(3, 64, 64),
        placement="before_activation",
    )
    plan = metaperturb.get_controller(model).plan
    assert len(plan.sites) == 8
    assert all(s.name == f"{s.block}.relu" and (s.hook, s.call) == ("input", 2) for s in plan.sites)
    twin = copy.deepcopy(model)
    seen, twin_seen = phi_inputs(model), phi_inputs(twin)
    x = torch.randn(2, 3, 64, 64)
    model.train(), twin.train()
    model(x), model(x)
    assert len(seen) == 16  # the count starts again with each forward of a block
    assert all(bool((h < 0).any()) for h in seen)  # the residual sum, not the relu's output
    twin(x)
    assert len(twin_seen) == 8 and len(seen) == 16  # the copy's hooks drive the copy's sites
    with metaperturb.disabled(model):
        torch.testing.assert_close(model(x), host.train()(x))


def test_wrap_puts_phi_where_it_was_meta_trained_unless_told_otherwise(tmp_path) -> None:
    phi = Perturbation(metaperturb.PerturbationConfig(placement="before_activation"))
    loaded = Perturbation.from_pretrained(phi.save_pretrained(tmp_path / "phi"))
    assert loaded.config.placement == "before_activation"
    host = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ActBlock(8), ActBlock(8))
    model = metaperturb.wrap(copy.deepcopy(host), phi=loaded, input_size=(3, 16, 16))
    assert metaperturb.get_controller(model).plan.placement == "before_activation"
    model = metaperturb.wrap(host, phi=loaded, input_size=(3, 16, 16), placement="output")
    assert metaperturb.get_controller(model).plan.placement == "output"


def test_update_bn_recomputes_batchnorm_statistics_under_the_eval_mode() -> None:
    """After update_bn on one batch, the eval forward normalises that batch with its own
    statistics under the expectation: what BatchNorm in training mode would compute."""
    model = wrapped(MyResNet()).train()
    for _ in range(3):
        model(torch.randn(8, 3, 16, 16))
    model.stem[1].eval()  # a layer kept frozen: its mode comes back
    momentum = model.body[0].na.momentum
    x = torch.randn(64, 3, 16, 16)
    metaperturb.update_bn([(x, torch.zeros(64))], model)  # (input, label) batches work
    assert model.training and not model.stem[1].training and model.body[0].na.momentum == momentum
    model.eval()
    recalibrated = model(x)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.train()
    with torch.no_grad():
        batch_statistics = model(x)
    torch.testing.assert_close(recalibrated, batch_statistics, rtol=1e-2, atol=1e-2)


def test_update_bn_keeps_the_statistics_when_it_cannot_finish() -> None:
    model = wrapped(MyResNet())
    model(torch.randn(8, 3, 16, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def failing() -> object:
        yield torch.randn(8, 3, 16, 16)
        raise OSError("the data went away")

    with pytest.raises(OSError, match="went away"):
        metaperturb.update_bn(failing(), model)
    with pytest.raises(ValueError, match="no batch"):
        metaperturb.update_bn([], model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])
    plain = MyResNet()
    metaperturb.update_bn([torch.randn(2, 3, 16, 16)], plain)  # a plain model: a control
    assert int(plain.body[0].na.num_batches_tracked) == 1


def test_update_bn_refuses_statistics_that_are_not_finite() -> None:
    """One batch whose features overflow (found on ResNet-44 with phi*: every prediction NaN
    after update_bn) makes the cumulative average inf and the layers after it NaN. Before, they
    were installed without a word; now the previous statistics stay and the error says so."""
    model = wrapped(MyResNet())
    model(torch.randn(8, 3, 16, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    overflowing = torch.randn(8, 3, 16, 16)
    overflowing[0, :, 4, 4] = float("inf")
    with pytest.raises(FloatingPointError, match=r"statistics of 'stem\.1' are not finite"):
        metaperturb.update_bn([torch.randn(8, 3, 16, 16), overflowing], model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])
    assert model.body[0].na.momentum == 0.1


def test_update_bn_stops_after_the_given_number_of_batches() -> None:
    model = wrapped(MyResNet())
    seen: list[int] = []

    def counted() -> object:
        for index in range(10):
            seen.append(index)
            yield torch.randn(4, 3, 16, 16)

    metaperturb.update_bn(counted(), model, batches=3)
    assert seen == [0, 1, 2]
    assert int(model.body[0].na.num_batches_tracked) == 3
