"""A wrapped model keeps working with the PyTorch and timm machinery users put around it."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn

import metaperturb
from metaperturb import Perturbation


def resnet20(**kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet20", num_classes=10)
    return metaperturb.wrap(model, phi=Perturbation(), input_size=(3, 16, 16), **kwargs)


def record_site_outputs(model: nn.Module) -> list[torch.Tensor]:
    """Capture what every site returns (hooks registered after wrap's run after its own)."""
    outputs: list[torch.Tensor] = []
    modules = dict(model.named_modules())
    for name in metaperturb.get_controller(model).site_names:
        modules[name].register_forward_hook(lambda m, a, out: outputs.append(out))
    return outputs


@pytest.mark.parametrize(
    ("placement", "memory_efficient"),
    [("output", False), ("before_activation", False), ("output", True)],
)
def test_torch_compile_fullgraph_has_no_graph_break(placement: str, memory_efficient: bool) -> None:
    torch._dynamo.reset()  # the parameters' models share code objects: recompiles add up
    model = resnet20(placement=placement, memory_efficient=memory_efficient)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 16, 16)
    for strength in (0.0, 1.0):  # at 0 the features, hence the statistics, are noise-free
        metaperturb.set_strength(model, strength)
        metaperturb.set_strength(eager, strength)
        compiled(x).sum().backward()  # train mode: sampled noise, batch statistics
        eager(x).sum().backward()
        if strength == 0.0:  # updated once per step, as in eager
            for a, b in zip(
                metaperturb.get_controller(model).sites,
                metaperturb.get_controller(eager).sites,
                strict=True,
            ):
                torch.testing.assert_close(a.running_mean, b.running_mean)
    model.eval()
    torch.testing.assert_close(compiled(x), model(x))
    perturbed = compiled(x)
    with metaperturb.disabled(compiled):  # a flag flip: recompiles once, hooks stay
        plain = compiled(x)
        torch.testing.assert_close(plain, model(x))
    assert not torch.allclose(plain, perturbed)
    metaperturb.set_strength(compiled, 0.0)  # a tensor: takes effect without recompiling
    torch.testing.assert_close(compiled(x), plain)
    metaperturb.set_strength(compiled, 1.0)
    sites = metaperturb.get_controller(compiled).site_names
    metaperturb.exclude_sites(compiled, sites)  # switched off at full strength: recompiles once
    torch.testing.assert_close(compiled(x), plain)


def test_autocast_bf16_keeps_dtype_through_every_site() -> None:
    model = resnet20()
    outputs = record_site_outputs(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(4, 3, 16, 16))
    assert logits.dtype == torch.bfloat16
    assert outputs and all(o.dtype == torch.bfloat16 for o in outputs)
    assert all(torch.isfinite(o.float()).all() for o in outputs)


def test_channels_last_is_preserved() -> None:
    model = resnet20().to(memory_format=torch.channels_last)
    outputs = record_site_outputs(model)
    x = torch.randn(4, 3, 16, 16).to(memory_format=torch.channels_last)
    model(x).sum().backward()
    assert all(o.is_contiguous(memory_format=torch.channels_last) for o in outputs)


def test_deepcopy_and_timm_model_ema() -> None:
    model = resnet20()
    x = torch.randn(4, 3, 16, 16)
    model(x)
    twin = copy.deepcopy(model)
    assert metaperturb.get_controller(twin) is not metaperturb.get_controller(model)
    hook = next(iter(dict(twin.named_modules())["stages.0.0"]._forward_hooks.values()))
    assert hook.controller is metaperturb.get_controller(twin)
    model.eval(), twin.eval()
    torch.testing.assert_close(twin(x), model(x))

    ema = ModelEmaV3(model, decay=0.5)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(x), torch.arange(4)).backward()
    optimizer.step()
    ema.update(model)
    ema_controller = metaperturb.get_controller(ema.module)
    torch.testing.assert_close(
        ema_controller.phi.scale_weight, metaperturb.get_controller(model).phi.scale_weight
    )
    assert ema.module(x).shape == (4, 10)


@pytest.mark.parametrize("placement", ["output", "before_activation"])
def test_timm_gradient_checkpointing_keeps_sites_firing_and_gradients_equal(
    placement: str,
) -> None:
    def grads(checkpointing: bool) -> tuple[int, list[torch.Tensor], list[torch.Tensor]]:
        torch.manual_seed(0)
        model = timm.create_model("resnet18", num_classes=4)
        metaperturb.wrap(
            model,
            phi=Perturbation(),
            input_size=(3, 64, 64),
            placement=placement,  # type: ignore[arg-type]
        )
        model.set_grad_checkpointing(checkpointing)
        controller = metaperturb.get_controller(model)
        real, calls = controller.site_function, []

        def counted(*args: object, **kwargs: object) -> torch.Tensor:
            calls.append(1)
            return real(*args, **kwargs)

        controller.site_function = counted
        torch.manual_seed(1)
        model(torch.randn(2, 3, 64, 64)).sum().backward()
        statistics = [s.running_mean.clone() for s in controller.sites]
        return (
            len(calls),
            [p.grad.clone() for p in model.parameters() if p.grad is not None],
            statistics,
        )

    plain_calls, plain, plain_statistics = grads(False)
    checkpointed_calls, checkpointed, checkpointed_statistics = grads(True)
    assert plain_calls == 8
    assert checkpointed_calls == 16  # recomputation in backward runs every site again
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b)
    # ... but moves phi's running statistics once per step, not again in the recomputation
    for a, b in zip(plain_statistics, checkpointed_statistics, strict=True):
        torch.testing.assert_close(a, b)


def test_torch_export_in_eval_mode() -> None:
    model = resnet20()
    x = torch.randn(2, 3, 16, 16)
    model(x)  # some running statistics
    model.eval()
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


def test_data_parallel_copies_are_refused_with_the_fix() -> None:
    """nn.DataParallel's per-GPU copies share the original's hooks, so phi would run the
    original's modules and statistics on every copy: refused, naming DDP. Its copies are made
    here as DataParallel makes them (no second GPU needed); one device runs the model itself."""
    model = resnet20()
    x = torch.randn(2, 3, 16, 16)
    replica = model._replicate_for_data_parallel()
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        replica(x)
    assert nn.DataParallel(model, device_ids=[])(x).shape == (2, 10)  # no copy: runs as is


def _ddp_worker(rank: int, world: int, store_path: str, out_dir: str, trainable: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = timm.create_model("cifar_resnet20", num_classes=10)
        metaperturb.wrap(model, phi=Perturbation(), input_size=(3, 16, 16), trainable=trainable)
        if not trainable:
            model.requires_grad_(True)  # a frozen phi stays frozen, and DDP must not wait for it
        ddp = nn.parallel.DistributedDataParallel(model)
        torch.manual_seed(100 + rank)  # each rank its own data and noise
        for _ in range(2):  # DDP reports a parameter without gradient at the next step
            ddp.zero_grad()
            loss = F.cross_entropy(ddp(torch.randn(4, 3, 16, 16)), torch.randint(0, 10, (4,)))
            loss.backward()
        phi = metaperturb.get_controller(ddp).phi
        grads = {
            n: (p.grad.clone() if p.grad is not None else None) for n, p in phi.named_parameters()
        }
        host = model.stages[0][0].conv1.weight.grad.clone()
        torch.save({"phi": grads, "host": host}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("trainable", [True, False])
def test_distributed_data_parallel_gives_consistent_phi_gradients(trainable: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "store"), tmp, trainable), nprocs=2)
        results = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.testing.assert_close(results[0]["host"], results[1]["host"])
    for name, grad in results[0]["phi"].items():
        other = results[1]["phi"][name]
        if trainable:
            assert grad is not None and grad.abs().sum() > 0
            torch.testing.assert_close(grad, other)
        else:
            assert grad is None and other is None


def test_torch_compile_fullgraph_before_a_relu_called_twice() -> None:
    """torchvision's blocks call one relu twice; the per-block call count compiles without a
    graph break and the compiled model matches eager."""
    import torchvision

    torch.manual_seed(0)
    model = metaperturb.wrap(
        torchvision.models.resnet18(num_classes=4),
        phi=Perturbation(),
        input_size=(3, 32, 32),
        placement="before_activation",
    )
    assert {site.call for site in metaperturb.get_controller(model).plan.sites} == {2}
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    compiled(x).sum().backward()
    model.eval()
    torch.testing.assert_close(compiled(x), model(x))
    with metaperturb.disabled(model):
        plain = model(x)
    assert not torch.allclose(compiled(x), plain)
