"""Monte-Carlo evaluation: average class probabilities over several sampled perturbations."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .wrapper import get_controller

__all__ = ["mc_predict"]


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
    # Each module's own mode, not just the model's: a host may keep some layers in eval mode
    # while training (frozen BatchNorm), and model.train() would switch them back.
    modes = {module: module.training for module in model.modules()}
    previous = controller.eval_mode
    model.eval()
    controller.eval_mode = "sample"
    try:
        total = torch.zeros((), device=inputs.device)
        for _ in range(samples):
            total = total + model(inputs).float().softmax(dim=-1)
        return total / samples
    finally:
        controller.eval_mode = previous
        for module, training in modes.items():
            module.training = training
