"""MetaPerturb quickstart: train a ResNet-20 on a small Fashion-MNIST with one extra line.

Runs on a laptop CPU in a few minutes, with no download: the data (3,000 train and 1,000 test
images, MIT licence) ships in ``examples/data/fashion-mnist-small``. The line that matters is::

    model = metaperturb.wrap(model)

It attaches phi*, the perturbation function meta-trained on Tiny ImageNet that ships inside the
package (loaded offline), after every residual block; phi stays frozen and only the network's
own weights learn. Training follows the paper's meta-test recipe,
scaled down: Adam (lr 1e-3, weight decay 5e-4), batch 128, lr x0.3 at 40/70/90% of the steps,
random crop (pad 4) + horizontal flip, and the perturbation strength ramping from 0 to full over
the first 40% of the steps (``metaperturb.StrengthScheduler``). After training,
``metaperturb.update_bn`` recomputes the BatchNorm statistics for the one-forward evaluation.

What this run does and does not show: it shows the mechanics (wrap, schedule, eval mode) end to
end. It does not show whether MetaPerturb helps. It is a strong regularizer, and strong
regularizers pay off on long schedules (the paper trains 10,000 steps); after a few epochs the
perturbed network is still underfitting, so its accuracy here, above or below ``--baseline``'s,
says little about the method. See the README's "Evaluation" section for measured comparisons.

Usage:
    python examples/quickstart.py              # MetaPerturb
    python examples/quickstart.py --baseline   # the same network without it
"""

from __future__ import annotations

import time

START = time.perf_counter()  # before the heavy imports: the printed wall time includes them

import argparse
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import metaperturb  # also registers cifar_resnet20 with timm

DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "fashion-mnist-small"
INPUT_SIZE = (1, 28, 28)


@dataclass
class Result:
    """What a run produced, returned by :func:`main` so tests need not parse the printout."""

    test_accuracy: float
    wrapped: bool
    seconds: float


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that two runs on one machine print the same numbers."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_split(data: Path, limit: int | None) -> tuple[dict[str, Tensor], list[str]]:
    """Load the parquet splits with Hugging Face ``datasets`` and decode them once.

    Decoding every image up front into one uint8 tensor (N, 1, 28, 28) makes each batch a slice
    of memory: no DataLoader workers, no per-step PNG decoding.
    """
    datasets.disable_progress_bars()
    files = {split: str(data / f"{split}.parquet") for split in ("train", "test")}
    dataset = datasets.load_dataset("parquet", data_files=files)
    names: list[str] = dataset["train"].features["label"].names
    tensors: dict[str, Tensor] = {}
    for split, part in dataset.items():
        if limit is not None:
            part = part.select(range(min(limit, len(part))))
        pixels = np.stack([np.asarray(image.convert("L")) for image in part["image"]])
        tensors[f"{split}_x"] = torch.from_numpy(pixels).unsqueeze(1)
        tensors[f"{split}_y"] = torch.tensor(part["label"], dtype=torch.long)
    return tensors, names


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random crop (zero padding 4) and horizontal flip, per image, on a whole batch at once."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (4, 4, 4, 4))
    top = torch.randint(0, 9, (batch,), generator=generator)
    left = torch.randint(0, 9, (batch,), generator=generator)
    rows = (top[:, None] + torch.arange(height))[:, :, None]  # (B, H, 1)
    cols = (left[:, None] + torch.arange(width))[:, None, :]  # (B, 1, W)
    cropped = padded.permute(0, 2, 3, 1)[torch.arange(batch)[:, None, None], rows, cols]
    cropped = cropped.permute(0, 3, 1, 2)
    flip = torch.rand(batch, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(-1), cropped)


def build_model(baseline: bool) -> nn.Module:
    """ResNet-20 for 1-channel 28x28 images, wrapped with MetaPerturb unless ``baseline``."""
    model = timm.create_model("cifar_resnet20", num_classes=10, in_chans=1)
    if baseline:
        return model
    model = metaperturb.wrap(model, input_size=INPUT_SIZE)  # the one line: the bundled phi*
    print(metaperturb.inspect(model))
    return model


def optimization(
    model: nn.Module, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The paper's meta-test optimisation: Adam (lr 1e-3, weight decay 5e-4) over what learns
    (phi is frozen, requires_grad False), lr x0.3 at 40%, 70% and 90% of the steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3, weight_decay=5e-4)
    milestones = sorted({max(1, int(total_steps * f)) for f in (0.4, 0.7, 0.9)})
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.3)


def train(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    normalize: tuple[float, float],
) -> None:
    """The paper's meta-test recipe (Adam, step decay, strength ramp), scaled down."""
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    total_steps = epochs * steps_per_epoch
    optimizer, lr_schedule = optimization(model, total_steps)
    strength = (
        metaperturb.StrengthScheduler(model, total_steps) if metaperturb.is_wrapped(model) else None
    )
    mean, std = normalize
    model.train()
    bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        seen = correct = 0
        loss_sum = 0.0
        bar.set_description(f"epoch {epoch + 1}/{epochs}")
        for start in range(0, len(images), batch_size):
            index = order[start : start + batch_size]
            x = augment(images[index].float().div_(255), generator).sub_(mean).div_(std)
            y = labels[index]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr_schedule.step()
            if strength is not None:
                strength.step()
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(loss.detach()) * len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", train_acc=f"{100 * correct / seen:.1f}%")
            bar.update()
    bar.close()


def training_batches(
    images: Tensor, normalize: tuple[float, float], batch_size: int, seed: int
) -> Iterator[Tensor]:
    """Augmented, normalized training inputs (no labels), as training saw them: what
    :func:`metaperturb.update_bn` needs."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = normalize
    order = torch.randperm(len(images), generator=generator)
    for start in range(0, len(images), batch_size):
        batch = images[order[start : start + batch_size]].float().div_(255)
        yield augment(batch, generator).sub_(mean).div_(std)


@torch.no_grad()
def evaluate(
    model: nn.Module, images: Tensor, labels: Tensor, normalize: tuple[float, float]
) -> float:
    """Test accuracy in percent, in eval mode (running statistics, no sampled noise)."""
    model.eval()
    if metaperturb.is_wrapped(model):
        # The default, made explicit: one deterministic pass with the noise at its expectation.
        metaperturb.set_eval_mode(model, "expectation")
    mean, std = normalize
    correct = 0
    for start in range(0, len(images), 500):
        x = images[start : start + 500].float().div_(255).sub_(mean).div_(std)
        correct += int((model(x).argmax(1) == labels[start : start + 500]).sum())
    return 100.0 * correct / len(images)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a ResNet-20 on a small Fashion-MNIST with MetaPerturb (or without it, "
        "--baseline) on the CPU and print its test accuracy.",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="train the same network without MetaPerturb, for comparison",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=3,
        help="passes over the 3,000 training images (default: 3, a few minutes on 2 CPU cores; "
        "MetaPerturb is meant for long schedules: the paper trains 10,000 steps)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the weights, phi, shuffling, augmentation and noise (default: 0)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=128, help="images per step (default: 128, the paper's)"
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="folder with train.parquet and test.parquet in Hugging Face image layout "
        "(default: the bundled examples/data/fashion-mnist-small)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice, usually one per core)",
    )
    # For tests: use only the first N train and test images.
    parser.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    require_positive(parser, args, ("epochs", "batch_size", "threads", "limit"))
    return args


def require_positive(
    parser: argparse.ArgumentParser, args: argparse.Namespace, flags: tuple[str, ...]
) -> None:
    """Refuse a count below 1 (when given) with the flag's name, as argparse refuses others."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")


def main(argv: list[str] | None = None) -> Result:
    """Run the quickstart end to end; returns the test accuracy for callers such as tests."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)

    data, names = load_split(args.data, args.limit)
    train_x = data["train_x"].float().div(255)
    normalize = (float(train_x.mean()), float(train_x.std()))
    print(
        f"data: {len(data['train_x'])} train / {len(data['test_x'])} test images, "
        f"{len(names)} classes ({', '.join(names)}) from {args.data}"
    )

    model = build_model(args.baseline)
    train_start = time.perf_counter()
    train(
        model,
        data["train_x"],
        data["train_y"],
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        normalize=normalize,
    )
    if metaperturb.is_wrapped(model):
        # Once after training: BatchNorm statistics recomputed as the one-forward eval runs the
        # sites (the README's "BatchNorm statistics for the one-forward eval").
        batches = training_batches(data["train_x"], normalize, args.batch_size, args.seed + 1)
        metaperturb.update_bn(batches, model, batches=20)
    accuracy = evaluate(model, data["test_x"], data["test_y"], normalize)
    seconds = time.perf_counter() - START
    wrapped = metaperturb.is_wrapped(model)
    label = "MetaPerturb" if wrapped else "baseline (no MetaPerturb)"
    print(f"{label}: test accuracy {accuracy:.2f}% on {len(data['test_y'])} images")
    print(
        f"wall time {seconds:.0f} s ({time.perf_counter() - train_start:.0f} s training and "
        f"evaluation, {torch.get_num_threads()} threads)"
    )
    print(
        f"This was {args.epochs} epoch(s): enough to check that everything runs, too short to "
        "judge the method. A strong regularizer like MetaPerturb pays off on long schedules; "
        "see the README's Evaluation section for measured comparisons."
    )
    return Result(test_accuracy=accuracy, wrapped=wrapped, seconds=seconds)


if __name__ == "__main__":
    main()
