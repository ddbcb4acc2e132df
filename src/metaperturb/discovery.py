"""Find where phi goes: after every block of a CNN, by looking at the model, not at its class.

One forward pass on a small example input (no gradients, every module in eval mode, nothing in
the model changed) records which modules run, how often, and what they return. From that:

* a *block* is a module with its own ``forward`` that holds at least one convolution producing
  a spatial map (so squeeze-excite gates, which convolve a 1x1 pooled map, are not blocks) and
  is more than one conv(+norm)(+act) *unit*. A block holding two or more blocks of one class, or
  merely returning one of its blocks' outputs, is a *stage*: its blocks get the sites instead.
  This covers ResNet / ResNeXt / Wide ResNet blocks, inverted residuals and MBConv, ConvNeXt,
  RegNet and DenseNet layers from torchvision and timm, and a user's own block classes alike;
* a model without blocks (VGG, Conv4) is *plain*: every conv(+norm)(+act) unit gets a site,
  placed after its last norm or activation module;
* ``strategy="stage"`` keeps only the last site of each run of sites with equal spatial size;
* an explicit list of module names overrides all of this.

The stem (what runs before the first site) and the head (after the last site) never get one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from ._modes import preserved_modes
from .errors import NoSitesError

__all__ = ["Placement", "PlannedSite", "SitePlan", "SkippedModule", "Strategy", "plan_sites"]

#: ``"block"``: a site after every block (the paper); ``"stage"``: one at the end of each stage.
Strategy = Literal["block", "stage"]
#: Where a site perturbs its block: ``"output"``, what the block returns; ``"before_activation"``,
#: the input of the block's final activation module where it has one (the authors' ResNets:
#: after the residual sum, before the last ReLU), else the output.
Placement = Literal["output", "before_activation"]

_PLAIN_FORWARDS = (nn.Sequential.forward, nn.Module.forward)
_NORMS = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
_ACTIVATION_NAMES = ("relu", "gelu", "silu", "swish", "mish", "elu", "sigmoid", "tanh", "act")


@dataclass(frozen=True)
class PlannedSite:
    """A module after which phi is applied, with what it produced in the planning pass."""

    name: str
    module_type: str
    channels: int
    height: int
    width: int
    role: str
    #: ``"output"``: phi perturbs what the module returns (a forward hook); ``"input"``: what it
    #: receives (a forward pre-hook; the module is the block's final activation).
    hook: str = "output"
    #: For an ``"input"`` site: the block it ends, and which of the module's calls in one forward
    #: of that block phi perturbs (torchvision's ResNet blocks run one ``relu`` module twice).
    block: str = ""
    call: int = 1


@dataclass(frozen=True)
class SkippedModule:
    """A module that could have looked like a site, and why it is not one."""

    name: str
    module_type: str
    reason: str


@dataclass
class SitePlan:
    """Where phi goes in one model: printed by :func:`metaperturb.inspect`."""

    model_type: str
    input_size: tuple[int, ...]
    strategy: str
    sites: list[PlannedSite]
    skipped: list[SkippedModule] = field(default_factory=list)
    placement: str = "output"
    #: The first layer to run, when it takes the image itself: ``wrap`` reads the input height
    #: there too, for hosts run through another method than ``forward``.
    stem: str | None = None
    #: Sites the strategy found and the caller left out (``exclude=``).
    excluded: list[PlannedSite] = field(default_factory=list)

    @property
    def widest(self) -> int:
        """The widest site's channel count, excluded sites included: the default
        ``channel_norm`` (leaving a site out does not change what phi sees at the others)."""
        return max(site.channels for site in self.sites + self.excluded)

    def __str__(self) -> str:
        size = "x".join(str(d) for d in self.input_size)
        title = (
            f"MetaPerturb plan for {self.model_type} (planned at input {size}, "
            f"strategy {self.strategy!r}, placement {self.placement!r}): {len(self.sites)} sites"
        )
        lines = [title]
        if self.sites:
            width = max(len(s.name) for s in self.sites)
            kinds = max(len(s.module_type) for s in self.sites)
            lines.append(
                f"  {'#':>3}  {'module':<{width}}  {'type':<{kinds}}  channels  size   role"
            )
            for i, s in enumerate(self.sites):
                lines.append(
                    f"  {i:>3}  {s.name:<{width}}  {s.module_type:<{kinds}}  {s.channels:>8}  "
                    f"{s.height}x{s.width:<4} {s.role}"
                )
        if self.excluded:
            names = ", ".join(site.name for site in self.excluded)
            lines.append(f"  left out (exclude=): {names}")
        if self.skipped:
            lines.append("  skipped:")
            width = max(len(s.name) for s in self.skipped)
            for skip in self.skipped:
                lines.append(f"    {skip.name:<{width}}  {skip.module_type}: {skip.reason}")
        return "\n".join(lines)


@dataclass
class _Record:
    """What one module did during the planning pass."""

    pre_order: int
    post_order: int = -1
    calls: int = 0
    input_shape: tuple[int, ...] | None = None
    output: Any = None
    last_output: Any = None
    shape: tuple[int, ...] | None = None
    kind: str = "none"


def _describe(output: Any) -> tuple[str, tuple[int, ...] | None]:
    if isinstance(output, Tensor):
        return f"a {output.dim()}-D tensor", tuple(output.shape)
    return f"a {type(output).__name__}", None


def _trace(model: nn.Module, example: Tensor) -> dict[str, _Record]:
    """Run ``model`` once on ``example`` and record every submodule's calls and outputs."""
    records: dict[str, _Record] = {}
    counter = iter(range(1 << 30))
    handles = []

    def pre_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            record = records.setdefault(name, _Record(pre_order=next(counter)))
            record.calls += 1
            if record.calls == 1 and args and isinstance(args[0], Tensor):
                record.input_shape = tuple(args[0].shape)

        return hook

    def post_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            record = records[name]
            record.last_output = output
            if record.post_order < 0:
                record.post_order = next(counter)
                record.output = output
                record.kind, record.shape = _describe(output)

        return hook

    with preserved_modes(model):
        try:
            for name, module in model.named_modules():
                if not name:
                    continue
                handles.append(module.register_forward_pre_hook(pre_hook(name)))
                handles.append(module.register_forward_hook(post_hook(name)))
            model.eval()
            with torch.no_grad():
                model(example)
        finally:
            for handle in handles:
                handle.remove()
    return records


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORMS)


def _is_act(module: nn.Module) -> bool:
    if any(True for _ in module.parameters(recurse=False)) and not isinstance(module, nn.PReLU):
        return False
    name = type(module).__name__.lower()
    return type(module).__module__.startswith("torch.nn.modules.activation") or any(
        key in name for key in _ACTIVATION_NAMES
    )


def _is_layer(module: nn.Module) -> bool:
    """Conv, norm or activation: the pieces a conv(+norm)(+act) unit is made of."""
    return _is_conv(module) or _is_norm(module) or _is_act(module)


def _has_own_forward(module: nn.Module) -> bool:
    return type(module).forward not in _PLAIN_FORWARDS


class _Model:
    """The traced model: names, records and the structural predicates built on them."""

    def __init__(self, model: nn.Module, records: dict[str, _Record]):
        self.root = model
        self.records = records
        self.modules = {name: module for name, module in model.named_modules() if name}

    def children(self, name: str) -> Iterator[str]:
        module = self.root if not name else self.modules[name]
        for child_name, _ in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if full in self.modules:
                yield full

    def descendants(self, name: str) -> Iterator[str]:
        prefix = f"{name}."
        return (n for n in self.modules if n.startswith(prefix))

    def ran(self, name: str) -> bool:
        return name in self.records and self.records[name].post_order >= 0

    def spatial(self, name: str) -> bool:
        """Ran and produced a (B, C, H, W) tensor with more than one position."""
        shape = self.records[name].shape if self.ran(name) else None
        return shape is not None and len(shape) == 4 and shape[2] * shape[3] > 1

    def feature_convs(self, name: str) -> list[str]:
        return [n for n in self.descendants(name) if _is_conv(self.modules[n]) and self.spatial(n)]

    def is_unit(self, name: str) -> bool:
        """One conv and nothing else with parameters but norms: a conv(+norm)(+act) unit."""
        parts = [self.modules[n] for n in self.descendants(name)]
        convs = [m for m in parts if _is_conv(m)]
        others = [
            m
            for m in parts
            if not _is_conv(m)
            and not _is_norm(m)
            and not any(_is_norm(a) for a in parts if m in a.modules())
            and any(True for _ in m.parameters(recurse=False))
        ]
        return len(convs) == 1 and not others

    def is_candidate(self, name: str) -> bool:
        module = self.modules[name]
        return (
            self.ran(name)
            and _has_own_forward(module)
            and any(True for _ in module.children())
            and not self.is_unit(name)
            and bool(self.feature_convs(name))
        )

    def top_candidates(self, name: str) -> list[str]:
        """Candidates below ``name`` with no candidate between them and ``name``."""
        found: list[str] = []
        for child in self.children(name):
            if self.is_candidate(child):
                found.append(child)
            else:
                found.extend(self.top_candidates(child))
        return found

    def stage_reason(self, name: str) -> str | None:
        """Why ``name`` is a stage rather than a block, or None if it is a block."""
        inner = self.top_candidates(name)
        if not inner:
            return None
        classes = Counter(type(self.modules[n]).__name__ for n in inner)
        repeated = [cls for cls, count in classes.items() if count >= 2]
        if repeated:
            return f"holds {classes[repeated[0]]} {repeated[0]} blocks: they get the sites"
        output = self.records[name].output
        for n in inner:
            if self.records[n].output is output:
                return f"returns the output of its block {n!r}, which gets the site"
        return None

    def site_problem(self, name: str) -> str | None:
        """Why phi cannot follow ``name``, or None if it can."""
        record = self.records.get(name)
        if record is None or record.post_order < 0:
            return "did not run in the planning forward pass"
        if record.calls != 1:
            return f"runs {record.calls} times per forward pass (shared module): ambiguous site"
        if record.shape is None:
            return f"returns {record.kind}, not a (B, C, H, W) tensor"
        if len(record.shape) != 4:
            return f"returns {record.kind} of shape {record.shape}, not a (B, C, H, W) feature map"
        if record.shape[1] < 2:
            return f"has {record.shape[1]} channel: phi needs at least 2"
        if record.shape[2] * record.shape[3] <= 1:
            return "returns a 1x1 feature map: phi's 3x3 kernels would see only padding"
        return None

    def site(self, name: str, role: str) -> PlannedSite:
        shape = self.records[name].shape or (0, 0, 0, 0)
        return PlannedSite(
            name, type(self.modules[name]).__name__, shape[1], shape[2], shape[3], role
        )

    def skipped(self, name: str, reason: str) -> SkippedModule:
        return SkippedModule(name, type(self.modules[name]).__name__, reason)

    def final_activation(self, name: str) -> tuple[str, int] | None:
        """The activation module whose output ``name`` returns (``name`` itself if it is one)
        and how many times it runs in one forward of ``name``; None if there is none."""
        candidates = [name, *self.descendants(name)]
        output = self.records[name].output
        for candidate in candidates:
            record = self.records.get(candidate)
            module = self.modules[candidate]
            if (
                _is_act(module)
                and not any(True for _ in module.children())  # a leaf, not e.g. an "ActBlock"
                and record is not None
                and record.last_output is output
            ):
                return candidate, record.calls
        return None

    def placed_site(self, name: str, role: str, placement: Placement) -> PlannedSite:
        """The site for ``name`` under ``placement`` (see :data:`Placement`)."""
        if placement == "output":
            return self.site(name, role)
        found = self.final_activation(name)
        if found is None:
            return self.site(name, f"{role}, output (no final activation module)")
        activation, calls = found
        where = "before its final activation" + (f" (call {calls} of {calls})" if calls > 1 else "")
        site = self.site(activation, f"{role} {name}, {where}")
        return replace(site, hook="input", block=name, call=calls)


def _find_blocks(traced: _Model, skipped: list[SkippedModule]) -> list[str]:
    blocks: list[str] = []

    def visit(name: str) -> None:
        for child in traced.children(name):
            if not traced.is_candidate(child):
                visit(child)
                continue
            reason = traced.stage_reason(child)
            if reason is not None:
                skipped.append(traced.skipped(child, f"stage: {reason}"))
                visit(child)
                continue
            problem = traced.site_problem(child)
            if problem is None:
                blocks.append(child)
            else:
                skipped.append(traced.skipped(child, problem))

    visit("")
    return blocks


def _find_units(traced: _Model, skipped: list[SkippedModule], covered: set[str]) -> list[str]:
    """Plain nets: each conv followed by its norm / activation modules, in execution order.

    The site goes after the unit's last module; every module of a kept unit joins ``covered``.
    """
    layers = [
        n
        for n in traced.modules
        if traced.ran(n)
        and _is_layer(traced.modules[n])
        and not any(n.startswith(f"{p}.") for p in traced.modules if _is_layer(traced.modules[p]))
    ]
    layers.sort(key=lambda n: traced.records[n].post_order)
    units: list[str] = []
    members: list[str] = []
    for n in [*layers, ""]:
        module = traced.modules.get(n)
        starts = module is not None and _is_conv(module) and traced.spatial(n)
        extends = bool(members) and module is not None and not _is_conv(module)
        if extends and traced.site_problem(n) is None:
            members.append(n)
            continue
        if members:
            problem = traced.site_problem(members[-1])
            if problem is None:
                units.append(members[-1])
                covered.update(members)
            else:
                skipped.append(traced.skipped(members[-1], problem))
        members = [n] if starts else []
    return units


def _report_outside(
    traced: _Model, sites: Sequence[str], skipped: list[SkippedModule], covered: set[str]
) -> None:
    """Name the stem, the head and the layers between blocks that carry no site."""
    covered = covered | set(sites)
    for site in sites:
        covered.update(traced.descendants(site))
    if not sites:
        return
    first = min(traced.records[s].pre_order for s in sites)
    last = max(traced.records[s].post_order for s in sites)
    reported = {s.name for s in skipped}
    for n, module in traced.modules.items():
        if n in covered or n in reported or not traced.ran(n):
            continue
        if any(n.startswith(f"{r}.") for r in reported):
            continue
        if not (_is_conv(module) or isinstance(module, nn.Linear) or traced.is_unit(n)):
            continue
        if any(traced.is_unit(p) and n.startswith(f"{p}.") for p in traced.modules):
            continue
        record = traced.records[n]
        if record.post_order < first:
            reason = "stem: runs before the first site"
        elif record.pre_order > last:
            reason = "head: runs after the last site"
        elif not traced.spatial(n):
            reason = "works on a 1x1 (pooled) map"
        else:
            reason = "between blocks (a transition or downsampling layer, not a block)"
        skipped.append(traced.skipped(n, reason))
        reported.add(n)


def _keep_stage_ends(traced: _Model, sites: list[str]) -> list[str]:
    ends: list[str] = []
    for i, name in enumerate(sites):
        shape = traced.records[name].shape
        following = traced.records[sites[i + 1]].shape if i + 1 < len(sites) else None
        if following is None or (shape is not None and following[2:] != shape[2:]):
            ends.append(name)
    return ends


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The planning input: timm's ``pretrained_cfg`` size if any, else 224 px; channels from the
    first convolution."""
    channels = next((int(m.in_channels) for m in model.modules() if isinstance(m, nn.Conv2d)), 3)
    height, width = 224, 224
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and len(cfg.get("input_size", ())) == 3:
        height, width = int(cfg["input_size"][1]), int(cfg["input_size"][2])
    return channels, height, width


def _stem(traced: _Model, image_shape: tuple[int, ...]) -> str | None:
    """The first leaf module to run, if what it received was the image."""
    leaves = (name for name in traced.records if next(traced.children(name), None) is None)
    first = min(leaves, key=lambda name: traced.records[name].pre_order, default=None)
    return first if first and traced.records[first].input_shape == image_shape else None


def plan_sites(
    model: nn.Module,
    *,
    strategy: Strategy | Sequence[str] = "block",
    input_size: Sequence[int] | None = None,
    placement: Placement = "output",
    exclude: Sequence[str] = (),
) -> SitePlan:
    """Decide where phi goes in ``model``; see the module docstring for the rules.

    Args:
        model: any ``nn.Module`` whose forward takes one (B, C, H, W) image batch.
        strategy: ``"block"``, ``"stage"``, or an explicit list of module names.
        input_size: (C, H, W) of the planning pass; by default from timm's ``pretrained_cfg``
            or 224 px. Only shapes depend on it, so any size the model accepts will do.
        placement: ``"output"`` or ``"before_activation"`` (see :data:`Placement`).
        exclude: names of sites the strategy finds that should go without phi (e.g. one a
            :class:`~metaperturb.ClosedSiteWarning` names).

    Raises:
        NoSitesError: no module of ``model`` can take phi, an explicit name is unusable, or
            ``exclude`` names a module that is not a site (or leaves none).
    """
    if placement not in get_args(Placement):
        raise ValueError(f"placement must be one of {get_args(Placement)}, got {placement!r}.")
    if isinstance(exclude, str):
        raise TypeError(f"exclude takes a list of module names: exclude=[{exclude!r}].")
    size = tuple(input_size) if input_size is not None else default_input_size(model)
    if len(size) != 3:
        raise ValueError(f"input_size must be (C, H, W), got {size!r}.")
    param = next(iter(model.parameters()), None)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, *size, generator=generator)
    if param is not None:
        example = example.to(
            device=param.device, dtype=param.dtype if param.is_floating_point() else None
        )
    try:
        records = _trace(model, example)
    except Exception as error:  # the model rejected the planning input
        raise NoSitesError(
            f"could not plan MetaPerturb sites: {type(model).__name__} failed on a planning batch "
            f"of shape {tuple(example.shape)} ({type(error).__name__}: {error}). Pass the size "
            "your model takes, e.g. metaperturb.wrap(model, input_size=(3, 32, 32))."
        ) from error
    traced = _Model(model, records)
    skipped: list[SkippedModule] = []

    if isinstance(strategy, str):
        if strategy not in ("block", "stage"):
            raise ValueError(
                f"strategy must be 'block', 'stage' or a list of module names, got {strategy!r}."
            )
        names = _find_blocks(traced, skipped)
        role = "block"
        covered: set[str] = set()
        if not names:
            names = _find_units(traced, skipped, covered)
            role = "conv unit"
        names.sort(key=lambda n: traced.records[n].post_order)
        if strategy == "stage":
            names = _keep_stage_ends(traced, names)
            role = f"end of stage ({role}s)"
        _report_outside(traced, names, skipped, covered)
        strategy_name: str = strategy
    else:
        names = list(strategy)
        problems = [
            f"{n!r}: not a submodule"
            if n not in traced.modules
            else f"{n!r}: {traced.site_problem(n)}"
            for n in names
            if n not in traced.modules or traced.site_problem(n) is not None
        ]
        if problems:
            raise NoSitesError("these sites cannot take phi: " + "; ".join(problems))
        role = "explicit"
        strategy_name = "explicit"

    unknown = sorted(set(exclude) - set(names))
    if unknown:
        raise NoSitesError(
            f"exclude names {unknown}, which {'is' if len(unknown) == 1 else 'are'} not a site "
            f"of {type(model).__name__} with strategy {strategy_name!r}. Its sites: {names}."
        )
    kept = [n for n in names if n not in set(exclude)]
    plan = SitePlan(
        stem=_stem(traced, tuple(example.shape)),
        model_type=type(model).__name__,
        input_size=size,
        strategy=strategy_name,
        sites=[traced.placed_site(n, role, placement) for n in kept],
        excluded=[traced.placed_site(n, role, placement) for n in names if n not in kept],
        skipped=sorted(
            skipped, key=lambda s: records[s.name].pre_order if s.name in records else 0
        ),
        placement=placement,
    )
    if not plan.sites and plan.excluded:
        raise NoSitesError(
            f"exclude leaves no site of {type(model).__name__} to wrap: it names all of {names}."
        )
    if not plan.sites:
        raise NoSitesError(
            f"{type(model).__name__} has no module after which phi can be applied: it needs "
            "convolutional blocks or conv units producing (B, C, H, W) maps with C >= 2 and more "
            f"than one position.\n{plan}\nPass explicit module names with sites=[...] if some "
            "module does qualify."
        )
    return plan
