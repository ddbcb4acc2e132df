"""One task of meta-training: its network theta_t, its optimizer, and its meta-training step.

Per step and task (METHOD.md, Algorithm 1): a train batch updates theta_t only; then a held-out
batch, with BatchNorm in eval mode but phi's scale statistics still updating, gives phi's
gradient, which is added to the sum over tasks. First order: theta_t is not differentiated
through, and the held-out loss updates nothing but phi.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import models as _models  # noqa: F401  (registers cifar_resnet20 & co. with timm)
from ..discovery import Placement
from ..phi import Perturbation
from ..tasks import Task
from ..wrapper import ATTRIBUTE, wrap
from .metrics import Meter
from .sampling import TaskStream, derive_seed

__all__ = ["TaskLearner", "batchnorm_eval", "create_task_network"]

_INIT_KEY = 1
_NOISE_KEY = 2


def create_task_network(name: str, num_classes: int, in_chans: int) -> nn.Module:
    """A timm model with a head for ``num_classes`` classes."""
    if not timm.is_model(name):
        raise ValueError(
            f"timm knows no model {name!r}; list candidates with timm.list_models('*{name}*'). "
            "The project's own models: cifar_resnet20, cifar_resnet44, cifar_wrn_28_2, conv4, conv6."
        )
    model: nn.Module = timm.create_model(
        name, pretrained=False, num_classes=num_classes, in_chans=in_chans
    )
    return model


@contextmanager
def batchnorm_eval(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers in eval mode (running statistics, no update), the rest unchanged.

    phi's sites follow the controller's own mode, so they keep using and updating batch
    statistics: the held-out pass of METHOD.md.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in norms]
    for module in norms:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(norms, modes, strict=True):
            module.train(mode)


class TaskLearner:
    """theta_t for one task: a network wrapped with the shared, trainable phi, and its Adam.

    Args:
        task: the task (classes and rows).
        phi: the shared perturbation function; every learner wraps the same object.
        train_stream, heldout_stream: the task's batches.
        model_name: timm name of the network.
        input_size: (C, H, W) of the images.
        lr, weight_decay: Adam settings for theta_t.
        seed: the run's seed (initialisation and noise are derived from it and the task).
        sites, placement: where phi goes (see :func:`metaperturb.wrap`).
        device: where the network lives.
        channels_last: network and batches in channels_last memory (faster on a CPU).
    """

    def __init__(
        self,
        task: Task,
        phi: Perturbation,
        train_stream: TaskStream,
        heldout_stream: TaskStream,
        *,
        model_name: str,
        input_size: Sequence[int],
        lr: float,
        weight_decay: float,
        seed: int,
        sites: str,
        device: torch.device,
        placement: str = "output",
        channels_last: bool = False,
    ) -> None:
        self.task = task
        self.phi = phi
        self.train_stream = train_stream
        self.heldout_stream = heldout_stream
        self.seed = seed
        # The initialisation depends on the task, not on which rank builds it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, _INIT_KEY, task.index))
            model = create_task_network(model_name, len(task.classes), int(input_size[0]))
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        self.model = wrap(
            model.to(device).to(memory_format=self.layout),
            phi=phi,
            trainable=True,
            sites=sites,
            input_size=input_size,
            placement=cast(Placement, placement),
        )
        self.theta = [
            p for name, p in self.model.named_parameters() if not name.startswith(f"{ATTRIBUTE}.")
        ]
        self.optimizer = torch.optim.Adam(self.theta, lr=lr, weight_decay=weight_decay)
        self.meter = Meter(device)

    def step(self, step: int, phi_grads: Sequence[Tensor]) -> Tensor:
        """Update theta_t on a train batch, then add phi's held-out gradient to ``phi_grads``.

        Returns the two losses (train, held-out) on the device, unsynchronised: the loop checks
        them once per step for all tasks."""
        # The noise of this task and step, whatever ran before it on this process.
        torch.manual_seed(derive_seed(self.seed, _NOISE_KEY, self.task.index, step))
        self.model.train()
        images, labels = self.train_stream.batch(step)
        images = images.contiguous(memory_format=self.layout)
        self.phi.freeze(True)  # phi's gradient from this loss is discarded: do not compute it
        try:
            logits = self.model(images)
            loss = F.cross_entropy(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        finally:
            self.phi.freeze(False)
        self.optimizer.step()
        train_loss = loss.detach()
        self.meter.add("train", train_loss, logits.detach(), labels)

        images, labels = self.heldout_stream.batch(step)
        images = images.contiguous(memory_format=self.layout)
        with batchnorm_eval(self.model):
            logits = self.model(images)
            loss = F.cross_entropy(logits, labels)
        parameters = list(self.phi.parameters())
        grads = torch.autograd.grad(loss, parameters)  # theta_t gets no gradient from it
        for total, grad in zip(phi_grads, grads, strict=True):
            total.add_(grad)
        self.meter.add("heldout", loss.detach(), logits.detach(), labels)
        return torch.stack([train_loss, loss.detach()])

    def state_dict(self) -> dict[str, Any]:
        """theta_t (with the sites' running statistics, without phi), its optimizer, and the
        metric sums since the last log record (a checkpoint between two records, e.g. a stop
        asked mid-interval, resumes to the same next record)."""
        prefix = f"{ATTRIBUTE}.phi."
        model = {k: v for k, v in self.model.state_dict().items() if not k.startswith(prefix)}
        return {
            "model": model,
            "optimizer": self.optimizer.state_dict(),
            "meter": self.meter.sums.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Missing phi keys are allowed by wrap's load hook; anything else must match.
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if "meter" in state:  # absent from checkpoints written before it was kept
            self.meter.sums.copy_(state["meter"])
