"""MetaPerturb with DistributedDataParallel: the quickstart's ResNet-20, one process per device.

Launch with ``torchrun`` (gloo on CPUs, NCCL on GPUs, one GPU per process)::

    torchrun --standalone --nproc-per-node 2 examples/ddp.py

Run without ``torchrun`` it trains in one process. What changes for MetaPerturb under DDP is
small, and each point is a line below:

* wrap first, then ``DistributedDataParallel``: ``wrap`` puts phi's (frozen) weights on DDP's
  ignore list, so DDP does not wait for gradients they never get;
* each process draws its own noise (seed the global generator per rank after building DDP), as
  each sees its own part of the batch;
* ``StrengthScheduler`` steps in every process; when it switches off a site whose channel scale
  closes, the processes agree on it (one all-reduce), so the replicas stay one network;
* ``update_bn`` and the test run in one process, after training.

At the end every process fingerprints its network and rank 0 checks that they are one network.
The data, recipe and caveats are the quickstart's (``examples/quickstart.py``): a few epochs
show the mechanics, not the method's benefit.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from quickstart import (
    DEFAULT_DATA,
    INPUT_SIZE,
    augment,
    evaluate,
    load_split,
    optimization,
    require_positive,
    training_batches,
)
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import metaperturb


def setup() -> tuple[int, int, torch.device]:
    """Rank, world size and device: from torchrun's environment, or one process without it."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cpu")
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def fingerprint(model: nn.Module) -> Tensor:
    """Two numbers that differ between two networks that are not the same: the sum and the sum
    of squares of every parameter. Not the buffers: each process's last forward moves its own
    BatchNorm statistics (DDP copies rank 0's at the start of each forward), so rank 0's are
    the ones to keep."""
    values = [p.detach().double() for p in model.parameters()]
    return torch.stack([sum(v.sum() for v in values), sum(v.square().sum() for v in values)])


def train(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    args: argparse.Namespace,
    rank: int,
    world: int,
    device: torch.device,
    normalize: tuple[float, float],
) -> metaperturb.StrengthScheduler:
    """The quickstart's recipe; each process takes every ``world``-th image of each batch."""
    ddp = DistributedDataParallel(model) if world > 1 else model  # after wrap
    torch.manual_seed(args.seed * 1000 + rank)  # each process its own noise
    order_generator = torch.Generator().manual_seed(args.seed)  # the same order in every process
    augment_generator = torch.Generator().manual_seed(args.seed * 1000 + rank)
    steps = args.epochs * math.ceil(len(images) / args.batch_size)
    optimizer, lr_schedule = optimization(model, steps)
    strength = metaperturb.StrengthScheduler(model, steps)
    mean, std = normalize
    ddp.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(images), generator=order_generator)
        loss_sum = torch.zeros((), device=device)
        for start in range(0, len(images), args.batch_size):
            index = order[start : start + args.batch_size][rank::world]
            x = augment(images[index].float().div_(255), augment_generator).sub_(mean).div_(std)
            x = x.to(device, memory_format=torch.channels_last)  # as the network (below)
            loss = F.cross_entropy(ddp(x), labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the gradients of the processes here
            optimizer.step()
            lr_schedule.step()
            strength.step()
            loss_sum += loss.detach()
        if rank == 0:
            batches = math.ceil(len(images) / args.batch_size)
            print(f"epoch {epoch + 1}/{args.epochs}: mean loss {float(loss_sum) / batches:.3f}")
    return strength


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train the quickstart's ResNet-20 with MetaPerturb under "
        "DistributedDataParallel (launch with torchrun) and print its test accuracy.",
    )
    parser.add_argument("--epochs", type=int, default=3, help="passes over the data (default: 3)")
    parser.add_argument(
        "--batch-size", type=int, default=128, help="images per step, all processes together"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="the quickstart's data layout"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per process")
    parser.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)  # for tests
    args = parser.parse_args()
    require_positive(parser, args, ("epochs", "batch_size", "threads", "limit"))
    return args


def main() -> None:
    args = parse_args()
    rank, world, device = setup()
    if args.batch_size < world:
        raise SystemExit(f"--batch-size {args.batch_size} is below the {world} processes")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        data, _ = load_split(args.data, args.limit)
        train_x = data["train_x"].float().div(255)
        normalize = (float(train_x.mean()), float(train_x.std()))
        torch.manual_seed(args.seed)  # DDP copies rank 0's weights to the others anyway
        model = timm.create_model("cifar_resnet20", num_classes=10, in_chans=1)
        model = metaperturb.wrap(model, input_size=INPUT_SIZE)  # before DDP
        # channels_last, the quickstart's layout too (its crop leaves 1-channel batches in it):
        # faster on a CPU, and the weights' layout then matches their gradients' (where they
        # differ, on 1x1 convolutions, DDP warns that its buckets do not fit them).
        model = model.to(device, memory_format=torch.channels_last)
        strength = train(
            model, data["train_x"], data["train_y"], args, rank, world, device, normalize
        )
        # The sites switched off live in the model (its state_dict), not in the scheduler.
        mine = (
            fingerprint(model).tolist(),
            sorted(metaperturb.get_controller(model).excluded_sites),
        )
        every: list[object] = [mine]
        if world > 1:
            every = [None] * world
            dist.all_gather_object(every, mine)
        if rank == 0:
            same = all(other == every[0] for other in every)
            processes = f"{world} process{'es' if world > 1 else ''}"
            print(f"replicas identical: {'yes' if same else 'NO'} ({processes})")
            print(f"sites switched off for closing: {strength.excluded or 'none'}")
            model.cpu()
            batches = training_batches(data["train_x"], normalize, args.batch_size, args.seed + 1)
            metaperturb.update_bn(batches, model, batches=20)
            accuracy = evaluate(model, data["test_x"], data["test_y"], normalize)
            print(f"MetaPerturb: test accuracy {accuracy:.2f}% on {len(data['test_y'])} images")
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
