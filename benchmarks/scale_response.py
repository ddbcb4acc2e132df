"""How each phi's channel scale s answers the size of the features it sees: why phi* closes a
site whose features grow, where the authors' phi does not.

phi's scale logit is linear in the 4 pooled scale maps' batch means and variances (METHOD.md,
step 3). Multiply a site's features h by a and each map's mean scales by a, its variance by a^2
(the maps are relu(conv(h)) with no bias), so the logit is ``a * A + a^2 * B + D``: the signs of
the weights on the maps decide whether s falls, rises or settles as the features grow. This
prints those weights for each phi, then measures s (mean over channels, batch statistics as in
training) at each site of an untrained ResNet-20 on a training batch of each target, with the
site's features scaled by each factor:

    python benchmarks/scale_response.py                 # phi* and the authors' phi
    python benchmarks/scale_response.py --phi seed-0=runs/phi-star/seed-0/phi

Writes ``benchmarks/results/scale-response.md`` and ``.json``. Seconds on a CPU.

``--signs`` asks the other question a pre-activation host raises: its block outputs are signed
(the residual stream, no ReLU after the sum), where phi* was meta-trained on non-negative ones.
It measures s at each site on the features as they are, on their non-negative part, and on both
rescaled to one RMS, for a network trained part-way (``--resume-from`` a run's checkpoint folder,
e.g. the one ``site_trace.py`` leaves), so size and sign can be told apart:

    python benchmarks/site_trace.py --target s-cifar10 --model cifar_wrn_28_2 --seed 0 \
        --until 300 --every 50
    python benchmarks/scale_response.py --signs --model cifar_wrn_28_2 --targets s-cifar10 \
        --resume-from runs/site-trace
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metaperturb._atomic import atomic_write
from metaperturb.hub import default_phi_path, load_phi
from metaperturb.phi import Perturbation
from metaperturb.transfer import TransferConfig, TransferRun
from metaperturb.wrapper import get_controller

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
AUTHORS_PHI = ROOT / "runs" / "authors-phi"  # converted by benchmarks/transfer.py, never shipped
RESULTS = ROOT / "benchmarks" / "results"
FACTORS = (0.5, 1.0, 2.0, 4.0, 8.0)


def scale_weights(phi: Perturbation) -> list[dict[str, float]]:
    """Per scale map: its kernel's sum (on smooth non-negative features, a map of a negative-sum
    kernel is mostly cut by the relu) and the weights the scale logit gives its mean and
    variance."""
    kernels = phi._weight(phi.scale_kernels).detach().reshape(4, -1)
    weight = phi._weight(phi.scale_weight).detach().flatten()
    return [
        {
            "kernel_sum": float(kernels[m].sum()),
            "mean_weight": float(weight[m]),
            "var_weight": float(weight[4 + m]),
        }
        for m in range(4)
    ]


def descriptor_weights(phi: Perturbation) -> dict[str, float]:
    """The scale logit's weights on the host descriptors C / channel_norm and H / spatial_norm:
    both descriptors lie in (0, 1], so together they move the logit by at most the sum of these
    weights' sizes, whatever the host."""
    weight = phi._weight(phi.scale_weight).detach().flatten()
    return {"channels": float(weight[8]), "height": float(weight[9])}


def site_features(
    target: str,
    seed: int,
    model: str = "cifar_resnet20",
    resume_from: Path | None = None,
    trained_with: str = "phi-star",
) -> tuple[list[str], list[Tensor], int, float, int]:
    """Each site's input on one training batch of ``target``, with the site names, the widest
    site's channels, the input height (what the descriptors divide by unless phi's config says
    otherwise) and the network's step. Untrained at strength 0 (the host's own features), or
    as the checkpoint in ``resume_from`` left it (a run of ``trained_with``: ``phi-star`` or
    ``authors``)."""
    phi = "default" if trained_with == "phi-star" else str(AUTHORS_PHI)
    config = TransferConfig(
        target=target, seed=seed, model=model, phi=phi, phi_name=trained_with, data_root=str(DATA)
    )
    # The run builds the network, phi and the augmented batches exactly as an evaluation run
    # does; it writes to its output folder only when it trains, which this never does.
    run = TransferRun(config, resume_from or RESULTS / "scale-response-unused")
    if resume_from is not None and not run.maybe_resume():
        raise SystemExit(
            f"no checkpoint of {run.id} in {resume_from}: make one with `python "
            f"benchmarks/site_trace.py --target {target} --model {model} --seed {seed} --until "
            "300` (add --phi runs/authors-phi --phi-name authors for the authors' phi)."
        )
    controller = get_controller(run.model)
    captured: dict[int, Tensor] = {}
    handles = [
        # Prepended: read the module's output before the site's own hook perturbs it.
        module.register_forward_hook(
            lambda _m, _a, out, i=index: captured.__setitem__(i, out.detach().float()),
            prepend=True,
        )
        for index, module in enumerate(controller.site_modules)
    ]
    run.model.train()
    with torch.no_grad():
        run.model(next(run.training_inputs(1, 0)))
    for handle in handles:
        handle.remove()
    features = [captured[i].contiguous() for i in range(len(controller.site_names))]
    height = float(controller.input_height)
    return list(controller.site_names), features, controller.plan.widest, height, run.step


def rms(h: Tensor) -> float:
    return float(h.pow(2).mean().sqrt())


def sign_forms(h: Tensor, size: float = 2.0) -> dict[str, Tensor]:
    """A site's features as they are, their non-negative part (what the same block would hand
    phi with a ReLU after it), and both rescaled to RMS ``size``: s on the four tells the
    features' size from their sign."""
    positive = torch.relu(h)
    return {
        "h": h,
        "relu(h)": positive,
        f"h at RMS {size:g}": h * (size / max(rms(h), 1e-12)),
        f"relu(h) at RMS {size:g}": positive * (size / max(rms(positive), 1e-12)),
    }


def mean_scale(phi: Perturbation, h: Tensor, widest: int, height: float) -> float:
    """s averaged over channels, from the batch statistics of ``h`` (training's s); the two
    descriptors as the sites compute them (phi's ``channel_norm`` and ``spatial_norm``, else the
    widest site's channels and the input height)."""
    maps = phi.scale_maps(h).float()
    mean, var = maps.mean(dim=0), maps.var(dim=0, unbiased=False)
    spatial = torch.tensor(h.shape[-2] / (phi.config.spatial_norm or height))
    channel_ratio = h.shape[1] / (phi.config.channel_norm or widest)
    return float(phi.channel_scale(mean, var, channel_ratio, spatial).mean())


def measure(phis: dict[str, Perturbation], targets: list[str], seed: int) -> dict[str, Any]:
    report: dict[str, Any] = {
        "factors": list(FACTORS),
        "weights": {name: scale_weights(phi) for name, phi in phis.items()},
        "descriptor_weights": {name: descriptor_weights(phi) for name, phi in phis.items()},
        "targets": {},
    }
    for target in targets:
        names, features, widest, height, _ = site_features(target, seed)
        sites: dict[str, Any] = {}
        for name, h in zip(names, features, strict=True):
            entry: dict[str, Any] = {"rms": rms(h), "s": {}}
            with torch.no_grad():
                for phi_name, phi in phis.items():
                    entry["s"][phi_name] = [
                        mean_scale(phi, h * factor, widest, height) for factor in FACTORS
                    ]
            sites[name] = entry
        report["targets"][target] = sites
    return report


def variance_term(phi: Perturbation, h: Tensor) -> float:
    """The part of s's logit that comes from the scale maps' batch variances, averaged over
    channels: it grows where the network's features grow or come to differ between images,
    with the sign of the phi's weights on the variances."""
    with torch.no_grad():
        maps = phi.scale_maps(h).float()
        weight = phi._weight(phi.scale_weight).flatten()[4:8]
        return float((maps.var(dim=0, unbiased=False) * weight).sum(dim=1).mean())


def measure_signs(
    phis: dict[str, Perturbation],
    target: str,
    seed: int,
    model: str,
    resume_from: Path | None,
    trained_with: str,
) -> dict[str, Any]:
    names, features, widest, height, step = site_features(
        target, seed, model, resume_from, trained_with
    )
    sites: dict[str, Any] = {}
    for name, h in zip(names, features, strict=True):
        with torch.no_grad():
            forms = sign_forms(h)
            sites[name] = {
                "rms": rms(h),
                "negative": float((h < 0).float().mean()),
                "s": {
                    phi_name: {
                        form: mean_scale(phi, x, widest, height) for form, x in forms.items()
                    }
                    for phi_name, phi in phis.items()
                },
                "variance_term": {
                    phi_name: {form: variance_term(phi, x) for form, x in forms.items()}
                    for phi_name, phi in phis.items()
                },
            }
    return {
        "target": target,
        "model": model,
        "seed": seed,
        "step": step,
        "trained_with": trained_with if resume_from is not None else None,
        "sites": sites,
    }


def signs_markdown(report: dict[str, Any]) -> str:
    trained = (
        f"trained {report['step']:,} steps with {report['trained_with']}"
        if report["trained_with"]
        else "untrained"
    )
    first = next(iter(report["sites"].values()))["s"]
    forms = list(next(iter(first.values())))
    lines = [
        (
            f"phi's mean channel scale s at each site of {report['model']} on {report['target']} "
            f"(seed {report['seed']}, {trained}; one training batch, batch statistics): on the "
            "site's features h as they are, on their non-negative part relu(h), and on both "
            "rescaled to one RMS (`python benchmarks/scale_response.py --signs`); in brackets "
            "the part of s's logit that the scale maps' batch variances give."
        ),
        "",
        "| site | RMS | share < 0 | phi | " + " | ".join(forms) + " |",
        "| --- | ---: | ---: | --- | " + " | ".join("---:" for _ in forms) + " |",
    ]
    for site, entry in report["sites"].items():
        for phi_name, values in entry["s"].items():
            terms = entry["variance_term"][phi_name]
            cells = " | ".join(f"{values[form]:.3f} ({terms[form]:+.2f})" for form in forms)
            lines.append(
                f"| {site} | {entry['rms']:.2f} | {entry['negative']:.2f} | {phi_name} | {cells} |"
            )
    return "\n".join(lines) + "\n"


def markdown(report: dict[str, Any]) -> str:
    factors = report["factors"]
    lines = [
        (
            "phi's channel scale s against the size of the features it sees "
            "(`python benchmarks/scale_response.py`)."
        ),
        "",
        (
            "Scale logit weights per scale map (a map of a negative-sum kernel is mostly cut by "
            "the relu on smooth non-negative features):"
        ),
        "",
        "| phi | map | kernel sum | weight on mean | weight on variance |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for phi_name, maps in report["weights"].items():
        for m, entry in enumerate(maps):
            lines.append(
                f"| {phi_name} | {m} | {entry['kernel_sum']:+.3f} | "
                f"{entry['mean_weight']:+.3f} | {entry['var_weight']:+.3f} |"
            )
    lines += [
        "",
        (
            "Weights on the host descriptors (each in (0, 1]; together they move the logit by at "
            "most the sum of their sizes, on any host):"
        ),
        "",
        "| phi | C / channel_norm | H / spatial_norm |",
        "| --- | ---: | ---: |",
    ]
    for phi_name, entry in report["descriptor_weights"].items():
        lines.append(f"| {phi_name} | {entry['channels']:+.3f} | {entry['height']:+.3f} |")
    for target, sites in report["targets"].items():
        header = " | ".join(f"x{f:g}" for f in factors)
        lines += [
            "",
            (
                f"{target}: mean s per site of an untrained ResNet-20 (one training batch), the "
                "site's features multiplied by each factor a; in brackets a * s, the size of what "
                "the site passes on relative to its features at x1 (the noise's mean aside):"
            ),
            "",
            f"| site | RMS at x1 | phi | {header} |",
            "| --- | ---: | --- | " + " | ".join("---:" for _ in factors) + " |",
        ]
        for site, entry in sites.items():
            for phi_name, values in entry["s"].items():
                cells = " | ".join(
                    f"{v:.3f} ({f * v:.2f})" for f, v in zip(factors, values, strict=True)
                )
                lines.append(f"| {site} | {entry['rms']:.2f} | {phi_name} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--phi", action="append", default=[], metavar="NAME=PATH", help="another phi to measure"
    )
    parser.add_argument("--targets", nargs="+", default=["omniglot-100", "s-cifar10"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="default: results/scale-response[-signs-...]")
    parser.add_argument(
        "--signs", action="store_true", help="s on h, relu(h) and both at one RMS, per site"
    )
    parser.add_argument("--model", default="cifar_resnet20", help="with --signs")
    parser.add_argument(
        "--resume-from", type=Path, help="with --signs: the folder of a run's checkpoint"
    )
    parser.add_argument(
        "--trained-with",
        choices=["phi-star", "authors"],
        default="phi-star",
        help="with --resume-from: the phi the checkpoint's run trained with",
    )
    args = parser.parse_args()
    phis = {"phi-star": load_phi(default_phi_path())}
    if (AUTHORS_PHI / "model.safetensors").is_file():
        phis["authors"] = load_phi(str(AUTHORS_PHI))
    for item in args.phi:
        name, _, path = item.partition("=")
        phis[name] = load_phi(path)
    if args.signs:
        report = measure_signs(
            phis, args.targets[0], args.seed, args.model, args.resume_from, args.trained_with
        )
        text = signs_markdown(report)
        trained = f"-{args.trained_with}-step{report['step']}" if args.resume_from else ""
        default = RESULTS / f"scale-response-signs-{args.model}-{args.targets[0]}{trained}"
    else:
        report = measure(phis, args.targets, args.seed)
        text = markdown(report)
        default = RESULTS / "scale-response"
    output = args.output or default
    atomic_write(output.with_suffix(".json"), json.dumps(report, indent=1) + "\n")
    atomic_write(output.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
