"""What phi does at each site while a target network trains: a trace to find out why a run fails.

Trains one evaluation run (``metaperturb eval``'s settings; resumable, its checkpoints in the
output folder) and every ``--every`` training steps records, per site, what phi sees and does:
the features' RMS, the batch variance of phi's four pooled scale maps (summed; phi*'s channel
scale s falls as it grows), s (mean, smallest, the share of channels below 0.01), and the
strength c, with the logits' spread across classes (0: the network answers the same for every
image). One JSON line per record in ``<output>/<run id>.trace.jsonl``.

    python benchmarks/site_trace.py --target omniglot-100 --seed 0 --until 5000

Stops at ``--until`` (the schedule stays that of ``--steps``); run it again with a larger
``--until`` to go on. Draws ``<run id>.trace.png`` beside the trace (``--plot TRACE`` draws an
existing one): s and the features' RMS per site, the strength and the logits' spread.
``--table TRACE --at 1000 4000 --key rms`` prints one quantity per site at those steps.
"""

from __future__ import annotations

import argparse
import io
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from metaperturb._atomic import atomic_write
from metaperturb.errors import TrainingStoppedError
from metaperturb.site import SiteState
from metaperturb.train.metrics import read_metrics
from metaperturb.transfer import TransferConfig, TransferRun
from metaperturb.wrapper import get_controller

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class SiteTracer:
    """Forward hooks that read each site's input (before phi) on every ``every``-th training
    forward, and stop the run after ``until`` of them."""

    def __init__(
        self,
        run: TransferRun,
        every: int,
        until: int,
        stop: threading.Event,
        sink: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.run, self.every, self.until, self.stop, self.sink = run, every, until, stop, sink
        self.controller = get_controller(run.model)
        self.step = run.step  # training forwards so far (the step about to run is step + 1)
        self.record: dict[str, Any] = {}
        self.records: list[dict[str, Any]] = []
        self.handles = [run.model.register_forward_pre_hook(self._count)]
        for index, module in enumerate(self.controller.site_modules):
            hook = self._site_hook(index)
            self.handles.append(module.register_forward_hook(hook, prepend=True))
        self.handles.append(run.model.register_forward_hook(self._logits))

    def _tracing(self, module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled() and self.step % self.every == 0

    def _count(self, module: nn.Module, args: Any) -> None:
        if module.training and torch.is_grad_enabled():
            self.step += 1
            if self.step >= self.until:
                self.stop.set()
            if self.step % self.every == 0:
                strength = float(self.controller.strength)
                self.record = {"step": self.step, "strength": strength, "sites": {}}

    def _site_hook(self, index: int) -> Any:
        name = self.controller.site_names[index]

        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            if not self._tracing(module):
                return
            controller, phi = self.controller, self.controller.phi
            with torch.no_grad():
                h = output.float()
                maps = phi.scale_maps(h).float()
                mean, var = maps.mean(dim=0), maps.var(dim=0, unbiased=False)
                ratio = h.shape[-2] / float(controller.input_height.clamp(min=1.0))
                s = phi.channel_scale(
                    mean, var, controller.channel_ratios[index], torch.tensor(ratio)
                )
                state = controller.sites[index]
                assert isinstance(state, SiteState)
                self.record["sites"][name] = {
                    "rms": float(h.pow(2).mean().sqrt()),
                    "maps_var": float(var.sum(dim=1).mean()),
                    "maps_mean": float(mean.sum(dim=1).mean()),
                    "s_mean": float(s.mean()),
                    "s_min": float(s.min()),
                    "s_below_0.01": float((s < 0.01).float().mean()),
                    "running_var": float(state.running_var.sum(dim=1).mean()),
                }

        return hook

    def _logits(self, module: nn.Module, args: Any, output: Tensor) -> None:
        if self._tracing(module) and self.record:
            with torch.no_grad():
                self.record["logit_spread"] = float(output.float().std(dim=1).mean())
            self.records.append(self.record)
            if self.sink is not None:
                self.sink(self.record)
            self.record = {}


def _records(trace: Path) -> list[dict[str, Any]]:
    """The trace's records; a line a kill cut short (the file is appended to) is skipped."""
    return read_metrics(trace)


def trace_table(trace: Path, steps: list[int], key: str = "s_mean") -> str:
    """A Markdown table of one recorded quantity per site (``s_mean``, ``rms``, ...) with the
    strength and the logits' spread, at the records nearest each of ``steps``: the numbers the
    README quotes from a trace."""
    records = _records(trace)
    sites = list(records[0]["sites"])
    lines = [
        f"| step | strength | logit spread | {' | '.join(f'{key} {site}' for site in sites)} |",
        "| ---: " * (3 + len(sites)) + "|",
    ]
    for wanted in steps:
        record = min(records, key=lambda r: abs(r["step"] - wanted))
        values = [record["sites"][site][key] for site in sites]
        lines.append(
            f"| {record['step']} | {record['strength']:.3f} | {record['logit_spread']:.3f} | "
            + " | ".join(f"{v:.3f}" for v in values)
            + " |"
        )
    return "\n".join(lines)


def plot_trace(trace: Path) -> Path:
    """s (mean over channels) and the features' RMS per site, and the strength with the logits'
    spread, against the step: one figure beside the trace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = _records(trace)
    steps = [r["step"] for r in records]
    sites = list(records[0]["sites"])
    figure, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    colours = plt.get_cmap("viridis")
    for index, site in enumerate(sites):
        colour = colours(index / max(1, len(sites) - 1))
        for axis, key in zip(axes[:2], ("s_mean", "rms"), strict=True):
            axis.plot(steps, [r["sites"][site][key] for r in records], color=colour, label=site)
    axes[0].set(title="phi's channel scale s (mean over channels)", xlabel="step", ylabel="s")
    axes[1].set(title="RMS of the features phi sees", xlabel="step", yscale="log")
    axes[1].legend(fontsize=7, ncol=3)
    axes[2].plot(steps, [r["strength"] for r in records], color="C3", label="strength c")
    axes[2].plot(steps, [r["logit_spread"] for r in records], color="0.3", label="logit spread")
    axes[2].set(title="strength and logits' spread across classes", xlabel="step")
    axes[2].legend()
    figure.suptitle(trace.name.removesuffix(".trace.jsonl"), fontsize=9)
    path = trace.with_suffix(".png")
    buffer = io.BytesIO()  # rendered whole, then moved into place
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return atomic_write(path, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="omniglot-100")
    parser.add_argument("--model", default="cifar_resnet20")
    parser.add_argument("--phi", default="default", help="'default' (phi*), a folder or a file")
    parser.add_argument("--phi-name", default="phi-star")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10_000, help="the schedule's length")
    parser.add_argument("--until", type=int, default=5_000, help="stop after this step")
    parser.add_argument("--every", type=int, default=10, help="steps between records")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-root", default=str(DATA))
    parser.add_argument(
        "--exclude",
        nargs="+",
        default=[],
        metavar="SITE",
        help="sites left without phi (wrap's exclude; named in the run id)",
    )
    parser.add_argument("--output-dir", default="runs/site-trace")
    parser.add_argument("--plot", type=Path, metavar="TRACE", help="only draw this trace")
    parser.add_argument(
        "--table", type=Path, metavar="TRACE", help="only print this trace's table (--at, --key)"
    )
    parser.add_argument(
        "--at", type=int, nargs="+", default=[250, 500, 1000, 2000, 3000, 4000], metavar="STEP"
    )
    parser.add_argument("--key", default="s_mean", help="s_mean, s_min, rms, maps_var, ...")
    args = parser.parse_args()
    if args.plot:
        print(plot_trace(args.plot))
        return
    if args.table:
        print(trace_table(args.table, args.at, args.key))
        return
    torch.set_num_threads(args.threads)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    config = TransferConfig(
        target=args.target,
        data_root=args.data_root,
        model=args.model,
        phi=args.phi,
        phi_name=args.phi_name,
        seed=args.seed,
        steps=args.steps,
        exclude=list(args.exclude),
        device="cpu",
        checkpoint_every=500,
    )
    stop = threading.Event()
    run = TransferRun(config, output, stop=stop)
    run.maybe_resume()
    trace = output / f"{run.id}.trace.jsonl"
    # Records past the checkpoint resumed from are recorded again: drop them, then append each
    # record as it comes, so that a run stopped any way keeps what it traced.
    kept = []
    if trace.is_file():
        kept = [r for r in _records(trace) if r["step"] <= run.step]
    atomic_write(trace, "".join(json.dumps(r) + "\n" for r in kept))
    with trace.open("a", buffering=1) as sink:  # line-buffered: a kill loses no record

        def write(record: dict[str, Any]) -> None:
            sink.write(json.dumps(record) + "\n")

        tracer = SiteTracer(run, args.every, args.until, stop, sink=write)
        try:
            run.train(progress=False)
        except TrainingStoppedError as stopped:
            if not stopped.asked:
                raise
    print(f"{len(kept) + len(tracer.records)} records to step {run.step} in {trace}")
    print(plot_trace(trace))
    for point in run.curve:
        print(point)


if __name__ == "__main__":
    main()
