"""Evaluating a network trained with MetaPerturb: Monte-Carlo averaging, and BatchNorm
statistics recomputed for the one-forward eval."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._modes import preserved_modes
from .wrapper import get_controller

__all__ = ["mc_predict", "update_bn"]


@torch.no_grad()
def mc_predict(model: nn.Module, inputs: Tensor, samples: int = 10) -> Tensor:
    """Softmax probabilities averaged over ``samples`` forward passes with sampled noise.

    The authors' evaluation (100 samples at the final test). The model is run in eval mode
    (running statistics for BatchNorm and phi's scale) with the sites in ``"sample"`` mode; every
    module's mode and the eval mode are restored afterwards. Costs ``samples`` forward passes;
    the default ``"expectation"`` eval mode needs one.
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}.")
    controller = get_controller(model)
    previous = controller.eval_mode
    with preserved_modes(model):
        model.eval()
        controller.eval_mode = "sample"
        try:
            total = torch.zeros((), device=inputs.device)
            for _ in range(samples):
                total = total + model(inputs).float().softmax(dim=-1)
            return total / samples
        finally:
            controller.eval_mode = previous


@torch.no_grad()
def update_bn(
    loader: Iterable[Any],
    model: nn.Module,
    device: torch.device | str | None = None,
    *,
    batches: int | None = None,
) -> None:
    """Recompute the host's BatchNorm running statistics as the wrapped model runs in eval mode.

    Training feeds every BatchNorm layer features multiplied by sampled noise, and its running
    variance averages that. The default ``"expectation"`` eval multiplies by the noise's mean
    instead, so the features downstream of a site vary less than the statistics assume (by up to
    half, measured on a ResNet-20), and the network is evaluated slightly off the point it was
    trained at. One pass over some training batches, with the sites in their eval mode and
    every BatchNorm layer averaging its batch statistics (``momentum=None``), removes that shift.
    Call it once after training, like ``torch.optim.swa_utils.update_bn`` (same argument order);
    every module's mode and momentum are restored, and the previous statistics if it fails
    (also when the recomputed statistics are not finite: ``FloatingPointError``). On
    a model without MetaPerturb it recomputes the statistics in eval mode all the same (the
    control that separates this shift from statistics that lag behind the weights).

    Args:
        loader: training batches: tensors, or tuples / lists whose first item is the input.
        model: the wrapped model.
        device: move each input there first.
        batches: stop after this many (default: the whole loader).
    """
    if batches is not None and batches < 1:
        raise ValueError(
            f"batches must be at least 1 (or None for the whole loader), got {batches}."
        )
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return
    momenta = {norm: norm.momentum for norm in norms}
    saved = {norm: [t.clone() for t in norm.buffers()] for norm in norms}
    with preserved_modes(model):
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average over the batches seen
            norm.train()
        try:
            _average_batches(loader, model, device, batches)
            _check_finite(norms, model)
        except BaseException:
            for norm, buffers in saved.items():  # the statistics the model had, not reset ones
                for buffer, value in zip(norm.buffers(), buffers, strict=True):
                    buffer.copy_(value)
            raise
        finally:
            for norm, momentum in momenta.items():
                norm.momentum = momentum


def _check_finite(norms: list[_BatchNorm], model: nn.Module) -> None:
    """Refuse statistics that are not finite rather than install them: one batch whose features
    overflowed makes a cumulative average inf, and every layer after it NaN."""
    names = {module: name for name, module in model.named_modules()}
    for norm in norms:
        buffers = [t for t in (norm.running_mean, norm.running_var) if t is not None]
        if not all(bool(torch.isfinite(t).all()) for t in buffers):
            raise FloatingPointError(
                f"update_bn: the recomputed statistics of {names.get(norm, 'a BatchNorm')!r} "
                "are not finite (the features reaching it overflowed on some batch); the "
                "previous statistics are kept. Check the model's outputs on these batches "
                "for inf or NaN before recomputing."
            )


def _average_batches(
    loader: Iterable[Any], model: nn.Module, device: torch.device | str | None, batches: int | None
) -> None:
    """Run ``model`` on up to ``batches`` inputs from ``loader`` (at least one)."""
    seen = 0
    for batch in loader:
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        model(inputs if device is None else inputs.to(device))
        seen += 1
        if seen == batches:  # before asking the loader for one more
            break
    if seen == 0:
        raise ValueError("update_bn got no batch from the loader; pass training batches.")
