"""The strength schedule: perturbation grows from none to full over the first part of training."""

from __future__ import annotations

import math
from typing import Any, Literal

from torch import nn

from .diagnostics import closed_on_any_rank, exclude_closed_sites, warn_closed_sites
from .wrapper import set_strength

__all__ = ["StrengthScheduler", "linear_ramp"]


def linear_ramp(step: int, total_steps: int, ramp_fraction: float = 0.4) -> float:
    """The paper's schedule: c rises linearly from 0 to 1 over the first ``ramp_fraction`` of
    ``total_steps``, then stays at 1 (the authors' code; the paper reports it works much better
    than full strength from the start)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}.")
    if not 0.0 <= ramp_fraction <= 1.0:
        raise ValueError(f"ramp_fraction must lie in [0, 1], got {ramp_fraction}.")
    ramp = ramp_fraction * total_steps
    return 1.0 if ramp == 0 else min(1.0, max(0.0, step / ramp))


class StrengthScheduler:
    """Sets a wrapped model's strength c every step, like an LR scheduler.

    Call :meth:`step` once per optimizer step. Starts at c = 0; ``state_dict`` / ``load_state_dict``
    resume it. Every ``check_every`` steps (0: never) it reads phi's channel scale at each site
    (one small device-to-host copy for all sites) and finds the sites where it is near 0: at full
    strength such a site would pass almost nothing, and a network can collapse behind it (phi* on
    Omniglot-100, README). By default (``on_closed_site="exclude"``) it switches phi off there
    (:func:`~metaperturb.exclude_sites`) with a :class:`~metaperturb.diagnostics.ClosedSiteWarning`,
    and :attr:`excluded` records the step: on phi*'s Omniglot-100 run that kept the network from
    collapsing, and on the ResNet-20 targets measured no site closes, so nothing changes there.
    It acts at the first check that finds a site closed; phi*'s closure of WRN-28-2's last block
    at step 200 passed by step 1,750 (README), so there it leaves out a site that would reopen.
    ``exclude_from`` waits for a strength before switching a site off: until then a closed site
    is only warned about and recorded, and one that reopens stays on (phi*'s Omniglot-100 site
    was still closed at half strength, WRN-28-2's had reopened).
    ``"warn"`` only warns, once per site: the method as published. Either way :attr:`closed`
    records each site found closed and the step: while it is empty the two settings have
    trained the same network (the checks read the statistics and draw no random numbers), and
    :attr:`last_closed` the last check that found each closed: a run that switched nothing off
    trained the network of any ``exclude_from`` above the strength of those checks.

    Example:
        >>> scheduler = StrengthScheduler(model, total_steps=10_000)  # doctest: +SKIP
        >>> for batch in loader:  # doctest: +SKIP
        ...     train_step(batch)
        ...     scheduler.step()
    """

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        ramp_fraction: float = 0.4,
        check_every: int = 100,
        on_closed_site: Literal["warn", "exclude"] = "exclude",
        exclude_from: float = 0.0,
    ) -> None:
        linear_ramp(0, total_steps, ramp_fraction)  # validates the arguments
        if not 0.0 <= exclude_from <= 1.0:
            raise ValueError(f"exclude_from is a strength in [0, 1], got {exclude_from}.")
        if check_every < 0:
            raise ValueError(f"check_every must be 0 (never) or positive, got {check_every}.")
        if on_closed_site not in ("warn", "exclude"):
            raise ValueError(f"on_closed_site must be 'warn' or 'exclude', got {on_closed_site!r}.")
        if exclude_from and on_closed_site != "exclude":
            raise ValueError(
                "exclude_from is the strength from which closed sites are switched off: it "
                "needs on_closed_site='exclude'."
            )
        self.on_closed_site = on_closed_site
        self.exclude_from = exclude_from
        #: Every site found closed at a check, with the step it was first found (either setting).
        self.closed: dict[str, int] = {}
        self._excluded: dict[str, int] = {}
        #: Every site found closed at a check, with the last such step; ``None`` when not known:
        #: resumed, past a check, from a scheduler saved before it recorded them.
        self.last_closed: dict[str, int] | None = {}
        #: False when :attr:`closed` may lack sites: resumed in "warn" mode, past a check, from a
        #: scheduler saved before it recorded them.
        self.closed_complete = True
        self.model = model
        self.total_steps = total_steps
        self.ramp_fraction = ramp_fraction
        self.check_every = check_every
        self.last_step = 0
        set_strength(model, self.strength)

    @property
    def full_strength_step(self) -> int:
        """The step after which the strength is 1 (with no ramp, the first)."""
        return max(1, math.ceil(self.ramp_fraction * self.total_steps))

    @property
    def strength(self) -> float:
        """The strength c at the current step (0 before the first :meth:`step`)."""
        return linear_ramp(self.last_step, self.total_steps, self.ramp_fraction)

    def step(self) -> float:
        """Advance one step and return the new strength."""
        self.last_step += 1
        set_strength(self.model, self.strength)
        step = self.last_step
        if not self.check_every or step % self.check_every:
            return self.strength
        # Inline, not a method: the warnings' stacklevel names the caller of step().
        found = closed_on_any_rank(self.model)
        warned = set(self.closed)  # at an earlier check
        for name in found:
            self.closed.setdefault(name, step)  # the step it was first found closed
            if self.last_closed is not None:
                self.last_closed[name] = step
        if self.on_closed_site == "exclude" and self.strength >= self.exclude_from:
            switched = exclude_closed_sites(self.model, step, found)
            self._excluded.update(dict.fromkeys(switched, step))
        else:
            waiting = self.exclude_from if self.on_closed_site == "exclude" else None
            warn_closed_sites(self.model, step, warned, waiting, found)
        return self.strength

    @property
    def excluded(self) -> dict[str, int]:
        """The sites switched off for closing, with the step (``on_closed_site="exclude"``)."""
        return dict(self._excluded)

    def state_dict(self) -> dict[str, Any]:
        """The step and schedule, for a training checkpoint (as an LR scheduler's)."""
        return {
            "last_step": self.last_step,
            "total_steps": self.total_steps,
            "ramp_fraction": self.ramp_fraction,
            "closed": dict(self.closed),
            "closed_complete": self.closed_complete,
            "excluded": dict(self._excluded),
            "last_closed": None if self.last_closed is None else dict(self.last_closed),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the schedule of :meth:`state_dict` and set the model's strength to its step."""
        self.last_step = int(state["last_step"])
        self.total_steps = int(state["total_steps"])
        self.ramp_fraction = float(state["ramp_fraction"])
        # Absent from schedulers saved before it. An older one's excluded sites are all that
        # closed in "exclude" mode; in "warn" mode it kept no record past its first check.
        self.closed = dict(state.get("closed", state.get("excluded", {})))
        if "closed" in state and "excluded" in state:
            self._excluded = dict(state["excluded"])
        else:  # saved before both were kept: in "exclude" mode each closed site was switched off
            self._excluded = dict(self.closed) if self.on_closed_site == "exclude" else {}
        checked = self.check_every and self.last_step >= self.check_every
        unrecorded = "closed" not in state and self.on_closed_site == "warn" and checked
        self.closed_complete = bool(state.get("closed_complete", True)) and not unrecorded
        if "last_closed" in state:
            last = state["last_closed"]
            self.last_closed = None if last is None else dict(last)
        else:
            self.last_closed = None if checked else {}
        set_strength(self.model, self.strength)
