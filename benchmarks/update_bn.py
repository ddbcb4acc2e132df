"""What recomputing BatchNorm statistics in eval mode (``metaperturb.update_bn``) is worth.

Trains one network with MetaPerturb through the evaluation harness (resumable; the final state,
phi's site statistics included, is kept as ``<run id>.final.pt``), then scores on the same test
images: the default expectation eval; the same after ``update_bn`` over 20 and 50 training
batches; the control, ``update_bn`` with the sites sampling noise as in training (it separates
the variance shift from statistics that merely lag behind the weights); and Monte Carlo.

    python benchmarks/update_bn.py --phi phi-star-seed-0=runs/phi-star/seed-0/phi --steps 3000

``--from-run RESULT.safetensors`` scores a network the evaluation grid trained and kept instead
of training one (``--phi``, ``--target``, ``--steps`` and ``--seed`` then come from its result):

    python benchmarks/update_bn.py --variance --threads 1 --from-run \
        'benchmarks/results/transfer/s-cifar10__cifar_wrn_28_2__metaperturb[phi-star]__10000steps__seed0.safetensors'

Writes ``benchmarks/results/update-bn/<run id>.json`` and ``.md``. ``--variance`` writes instead
(``<run id>.variance.md``) why it helps: for each BatchNorm layer, the variance of its input
over one training batch in eval mode divided by its running variance, with the sites sampling
noise and with the expectation.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from eval_overflow import restore
from torch import nn

from metaperturb import is_wrapped, set_eval_mode, update_bn
from metaperturb._atomic import atomic_write
from metaperturb.transfer import TransferConfig, TransferRun

RESULTS = Path(__file__).parent / "results" / "update-bn"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="s-cifar10")
    parser.add_argument("--phi", metavar="NAME=PATH", help="the phi to train with")
    parser.add_argument(
        "--from-run",
        type=Path,
        metavar="RESULT.safetensors",
        help="a finished evaluation run's weights (its .json beside them): no training",
    )
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=5000, help="test images scored")
    parser.add_argument("--mc", type=int, default=20, help="Monte-Carlo samples")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-root", default=str(DATA))
    parser.add_argument("--variance", action="store_true", help="the variance table only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.from_run is None and (args.phi is None or "=" not in args.phi):
        parser.error("give --phi NAME=PATH (a phi to train with) or --from-run")
    if args.from_run is None:
        run = trained(args)
    else:  # restoring writes nothing: the run's folder is a formality
        with tempfile.TemporaryDirectory() as scratch:
            run = restore(args.from_run, Path(scratch))
    if args.variance:
        text = variance_table(run)
        atomic_write(RESULTS / f"{run.id}.variance.md", text + "\n")
        print(text)
        return
    score(run, args)


def trained(args: argparse.Namespace) -> TransferRun:
    """A network trained with ``--phi`` through the harness (resumable; kept as .final.pt)."""
    name, path = args.phi.split("=", 1)
    config = TransferConfig(
        target=args.target,
        data_root=args.data_root,
        phi=path,
        phi_name=name,
        seed=args.seed,
        steps=args.steps,
        device="cpu",
        checkpoint_every=250,
        curve_every=0,
    )
    run = TransferRun(config, RESULTS)
    final = RESULTS / f"{run.id}.final.pt"
    if final.is_file():
        state = torch.load(final, map_location="cpu", weights_only=True)
        run.model.load_state_dict(state["model"])
    else:
        run.maybe_resume()
        run.train(progress=True)
        import io

        buffer = io.BytesIO()
        torch.save({"model": run.model.state_dict(), "step": run.step}, buffer)
        atomic_write(final, buffer.getvalue())
        run.checkpoint_path.unlink(missing_ok=True)
    return run


def score(run: TransferRun, args: argparse.Namespace) -> None:
    """Each one-forward evaluation and Monte Carlo on the same test images; writes the table."""
    rows = torch.linspace(0, len(run.test_data) - 1, args.images).long()
    labels = run.test_data.labels[rows]

    def accuracy(samples: int | None = None) -> float:
        torch.manual_seed(1)
        predicted = run.predict(rows, samples=samples).argmax(1)
        return round(100 * float((predicted == labels).float().mean()), 2)

    def batches(count: int) -> Iterator[torch.Tensor]:
        return run.training_inputs(count, 50_000)

    trained = {k: v.clone() for k, v in run.model.state_dict().items()}
    scores = {"expectation (default)": accuracy()}
    for count in (20, 50):
        update_bn(batches(count), run.model)
        scores[f"expectation after update_bn, {count} batches"] = accuracy()
        run.model.load_state_dict(trained)
    set_eval_mode(run.model, "sample")
    update_bn(batches(50), run.model)
    set_eval_mode(run.model, "expectation")
    scores["control: update_bn with sampled noise, 50 batches"] = accuracy()
    run.model.load_state_dict(trained)
    scores[f"MC-{args.mc} (trained statistics)"] = accuracy(samples=args.mc)

    header = (
        f"{run.id}: {args.images} of {len(run.test_data)} test images, torch {torch.__version__}"
    )
    lines = [header, "", "| evaluation | forwards | test accuracy % |", "| --- | ---: | ---: |"]
    for label, value in scores.items():
        forwards = args.mc if label.startswith("MC-") else 1
        lines.append(f"| {label} | {forwards} | {value:.2f} |")
    text = "\n".join(lines)
    atomic_write(
        RESULTS / f"{run.id}.json",
        json.dumps({"id": run.id, "images": args.images, "scores": scores}, indent=1) + "\n",
    )
    atomic_write(RESULTS / f"{run.id}.md", text + "\n")
    print(text)


def _running_var(norm: nn.BatchNorm2d) -> torch.Tensor:
    assert norm.running_var is not None, "BatchNorm layers here track running statistics"
    return norm.running_var


def variance_table(run: TransferRun) -> str:
    """Input variance of each BatchNorm layer / its running variance, per eval mode. A network
    without phi (Base) has one mode: both columns are its plain forward."""
    wrapped = is_wrapped(run.model)
    norms = [(n, m) for n, m in run.model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    seen: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_pre_hook(
            lambda m, a, name=name: seen.__setitem__(name, a[0].float().var(dim=(0, 2, 3)))
        )
        for name, module in norms
    ]
    images = next(run.training_inputs(1, 50_000))
    ratios: dict[str, dict[str, float]] = {}
    run.model.eval()
    for mode in ("sample", "expectation"):
        if wrapped:
            set_eval_mode(run.model, mode)
        torch.manual_seed(0)
        with torch.no_grad():
            run.model(images)
        # Channels whose running variance is 0 (dead after training) have no ratio.
        ratios[mode] = {
            n: float((seen[n] / _running_var(m))[_running_var(m) > 0].mean()) for n, m in norms
        }
    dead = {n: int((_running_var(m) == 0).sum()) for n, m in norms}
    if wrapped:
        set_eval_mode(run.model, "expectation")
    for handle in handles:
        handle.remove()
    lines = [
        (
            f"{run.id}: input variance / running variance of each BatchNorm layer, eval mode, "
            "one training batch (mean over the channels whose running variance is not 0)"
        ),
        "",
        (
            "| BatchNorm layer | sites sample noise | sites use the expectation | channels with "
            "running variance 0 |"
        ),
        "| --- | ---: | ---: | ---: |",
    ]
    for name, module in norms:
        lines.append(
            f"| {name} | {ratios['sample'][name]:.2f} | {ratios['expectation'][name]:.2f} "
            f"| {dead[name]} of {module.num_features} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
