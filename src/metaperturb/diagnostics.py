"""What phi does at each site of a wrapped model, read from its running statistics.

phi's channel scale s (METHOD.md step 3) decides how much of each channel a site passes at full
strength: the site multiplies its features by ``(s * z - 1) * c + 1``, so where s is near 0 on
every channel, the site passes almost nothing once the strength c reaches 1, and nothing before it
can learn through it. That is how phi* failed on Omniglot-100 (README, Evaluation): s fell to 0
at the last block from the first steps, the network grew its features there to make up for the
closing gate, which kept s at 0, and at c = 1 its predictions stopped depending on the input.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .site import SiteState
from .wrapper import exclude_sites, get_controller

__all__ = [
    "CLOSED_BELOW",
    "ClosedSiteWarning",
    "channel_scales",
    "closed_among",
    "closed_on_any_rank",
    "closed_sites",
    "exclude_closed_sites",
    "mean_channel_scales",
]

#: A site whose mean channel scale is below this passes under about 1% of its features at full
#: strength (E[z] is about 1). Measured on Omniglot-100 with ResNet-20 (docs/evaluation.md):
#: phi*'s last block fell below it by step 220 and stayed closed, and the network collapsed when
#: the strength reached 1; the authors' phi dipped to 0.025 at that block and reopened (0.29 by
#: step 3,000), so 0.05, the first threshold, warned about a site that did no harm. Healthy
#: sites: 0.09-0.6.
CLOSED_BELOW = 0.01


class ClosedSiteWarning(UserWarning):
    """phi's channel scale s is near 0 at a site: at full strength it passes almost nothing."""


def channel_scales(model: nn.Module) -> dict[str, Tensor]:
    """phi's channel scale s at each site, ``(C,)`` per site name on the model's device, from the
    running statistics (what eval mode uses; in training each batch's statistics give values
    around these).

    The spatial descriptor uses the site's height over the input height of the plan ``wrap``
    made, or phi's ``spatial_norm`` when it has one, as the sites do. A site switched off
    (:func:`~metaperturb.exclude_sites`) no longer updates its statistics: its s stays what it
    was then.
    """
    controller = get_controller(model)
    phi, plan = controller.phi, controller.plan
    scales = {}
    with torch.no_grad():
        for index, (name, site) in enumerate(zip(controller.site_names, plan.sites, strict=True)):
            state = cast(SiteState, controller.sites[index])
            norm = phi.config.spatial_norm or plan.input_size[-2]
            scales[name] = phi.channel_scale(
                state.running_mean.float(),
                state.running_var.float(),
                controller.channel_ratios[index],
                torch.tensor(site.height / norm),
            )
    return scales


def closed_among(means: dict[str, float], below: float = CLOSED_BELOW) -> dict[str, float]:
    """Of sites' mean channel scales (e.g. a run's recorded ones), those below ``below``, and
    those that are NaN (statistics a diverged network poisoned pass nothing useful either)."""
    return {name: mean for name, mean in means.items() if not mean >= below}


def mean_channel_scales(model: nn.Module) -> dict[str, float]:
    """:func:`channel_scales` averaged over each site's channels, read back in one
    device-to-host copy for all sites, not one per site."""
    scales = channel_scales(model)
    means = torch.stack([s.float().mean() for s in scales.values()]).tolist()
    return dict(zip(scales, means, strict=True))


def closed_sites(model: nn.Module, below: float = CLOSED_BELOW) -> dict[str, float]:
    """The sites whose mean channel scale s is below ``below``, with that mean. A site switched
    off (:func:`~metaperturb.exclude_sites`) passes its features whole, so it is not one."""
    controller = get_controller(model)
    off = {controller.site_names[i] for i in controller.excluded_sites}
    return {
        name: s
        for name, s in closed_among(mean_channel_scales(model), below).items()
        if name not in off
    }


def closed_on_any_rank(model: nn.Module) -> list[str]:
    """The names of :func:`closed_sites` joined over the ranks of ``torch.distributed``, in site
    order: each rank's running statistics have seen only its own batches since the last
    broadcast, so without this the replicas could disagree. One small all-reduce, which every
    rank must reach."""
    controller = get_controller(model)
    sites = controller.site_names
    closed = closed_sites(model)
    flags = [name in closed for name in sites]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        joined = torch.tensor(flags, dtype=torch.int32, device=controller.strength.device)
        dist.all_reduce(joined, op=dist.ReduceOp.MAX)
        flags = [bool(flag) for flag in joined.tolist()]
    return [name for name, flag in zip(sites, flags, strict=True) if flag]


def exclude_closed_sites(
    model: nn.Module, step: int, closed: Collection[str] | None = None
) -> list[str]:
    """Switch phi off (:func:`~metaperturb.exclude_sites`) at each site still on whose mean
    channel scale is below :data:`CLOSED_BELOW`, with a warning naming them; returns them.

    Under ``torch.distributed`` a site closed on any rank is switched off on every rank, so the
    replicas stay the same network. ``closed``: :func:`closed_on_any_rank`, when the caller
    has it already.
    """
    names = list(closed_on_any_rank(model) if closed is None else closed)
    if not names:
        return []
    exclude_sites(model, names)
    warnings.warn(
        f"at step {step}, phi's channel scale s is near 0 at {names}: a site that stays closed "
        "until the strength reaches 1 passes almost nothing (on Omniglot-100 that collapsed "
        "the network; one can also reopen, as on WRN-28-2), so phi is switched off there for "
        "the rest of training and at test time (on_closed_site='exclude'); the other sites go "
        "on.",
        ClosedSiteWarning,
        stacklevel=3,
    )
    return names


def warn_closed_sites(
    model: nn.Module,
    step: int,
    already: Collection[str] = (),
    exclude_from: float | None = None,
    closed: Collection[str] | None = None,
) -> list[str]:
    """Warn once about the closed sites not in ``already`` (those warned about); returns them.
    Under ``torch.distributed`` a site closed on any rank counts, as it does for
    :func:`exclude_closed_sites`, so the two find the same sites. ``exclude_from``: the strength
    at which the caller will switch phi off at sites still closed (the advice says so).
    ``closed``: :func:`closed_on_any_rank`, when the caller has it already."""
    found = closed_on_any_rank(model) if closed is None else closed
    names = [name for name in found if name not in already]
    if not names:
        return []
    local = closed_sites(model)  # each site's mean s, for the message: only when it warns
    listed = ", ".join(
        f"{name!r} (mean s {local[name]:.4f})" if name in local else f"{name!r} (on another rank)"
        for name in names
    )
    if exclude_from is None:
        advice = (
            f"Leave it out (metaperturb.wrap(model, exclude={sorted(names)!r}) from the start, "
            "or StrengthScheduler(..., on_closed_site='exclude') to switch such sites off as "
            "they close) or use another phi"
        )
    else:
        advice = (
            f"phi is switched off there if it is still closed once the strength reaches "
            f"{exclude_from:g} (exclude_from)"
        )
    warnings.warn(
        f"at step {step}, phi's channel scale s is near 0 at {listed}: if it stays closed until "
        "the strength reaches 1, such a site passes almost nothing, and nothing before it "
        "learns through it (on Omniglot-100 this made phi* collapse the network to chance at "
        f"the end of the ramp; on WRN-28-2 the site reopened). {advice}; "
        "metaperturb.channel_scales(model) shows s at every site.",
        ClosedSiteWarning,
        stacklevel=3,
    )
    return names
