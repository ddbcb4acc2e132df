"""Attach phi to a host model with forward hooks, and take it off again.

The host keeps its modules, its parameter names and its forward. What ``wrap`` adds is one
child module, ``model.metaperturb`` (a :class:`MetaPerturb` holding phi, the per-site running
statistics and the annealing strength), plus one forward hook per site, a forward pre-hook on
the model that checks the sites are in place, and one on its first layer (or on the model) that
records the input's height. ``unwrap`` removes all of it.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.hooks import RemovableHandle

from . import _sequential_host
from .discovery import Placement, SitePlan, Strategy, plan_sites
from .errors import AlreadyWrappedError, ModelChangedError, NoSitesError, NotWrappedError
from .phi import Perturbation
from .site import EvalMode, SiteState, perturb

__all__ = [
    "ATTRIBUTE",
    "MetaPerturb",
    "disabled",
    "exclude_sites",
    "get_controller",
    "inspect",
    "is_wrapped",
    "set_eval_mode",
    "set_strength",
    "unwrap",
    "wrap",
]

#: Name of the child module ``wrap`` adds to the host: its keys in ``state_dict`` start with it.
ATTRIBUTE = "metaperturb"
_EVAL_MODES = ("expectation", "sample", "off")


class _SiteHook:
    """Forward hook of one site. A callable object, not a closure, so that ``copy.deepcopy`` of
    the host gives hooks bound to the copy's controller rather than to the original's."""

    def __init__(self, controller: MetaPerturb, index: int) -> None:
        self.controller = controller
        self.index = index

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return self.controller.apply_site(self.index, output)


class _SiteInputHook:
    """Forward pre-hook of a site placed before a block's final activation: perturbs what the
    activation module receives on its ``call``-th call in one forward of the block (a block may
    run one activation module several times; :class:`_CountReset` restarts the count). A
    callable object for the same deepcopy reason as :class:`_SiteHook`."""

    def __init__(self, controller: MetaPerturb, index: int, call: int) -> None:
        self.controller = controller
        self.index = index
        self.call = call
        self.seen = 0

    def __call__(self, module: nn.Module, args: Any) -> Any:
        self.seen += 1
        if self.seen != self.call or not args or not isinstance(args[0], Tensor):
            return None
        return (self.controller.apply_site(self.index, args[0]), *args[1:])


class _CountReset:
    """Forward pre-hook of the block that holds an input site: a new forward of the block (or
    its recomputation under activation checkpointing) counts the activation's calls anew."""

    def __init__(self, site: _SiteInputHook) -> None:
        self.site = site

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.site.seen = 0


class _HeightHook:
    """Forward pre-hook that records the input height for the spatial descriptor. On the host's
    first layer when that layer takes the image (so that another entry point than ``forward``,
    timm's ``forward_features`` or a loop over the stages, records it too), else on the host."""

    def __init__(self, controller: MetaPerturb) -> None:
        self.controller = controller

    def __call__(self, module: nn.Module, args: Any) -> None:
        if args and isinstance(args[0], Tensor) and args[0].dim() == 4:
            self.controller.input_height.fill_(args[0].shape[-2])


class _CheckSitesHook:
    """Forward pre-hook of the host: checks the sites still hold the modules ``wrap`` hooked."""

    def __init__(self, controller: MetaPerturb) -> None:
        self.controller = controller

    def __call__(self, module: nn.Module, args: Any) -> None:
        if getattr(module, "_is_replica", False):
            # nn.DataParallel's copy for another GPU: it shares the original's hooks, so phi
            # would run the original controller (its device, its statistics) on the copy.
            raise TypeError(
                "a MetaPerturb-wrapped model does not run under nn.DataParallel with several "
                "GPUs: its per-GPU copies share the original's hooks, so phi would run on the "
                "first GPU's modules and statistics. Use DistributedDataParallel (one process "
                "per GPU, e.g. torchrun; see examples/ddp.py), which MetaPerturb supports."
            )
        self.controller.check_sites(module)


def _recomputing_in_backward() -> bool:
    """Whether this forward runs inside a backward pass: the recomputation of activation
    checkpointing (timm's ``set_grad_checkpointing``, ``torch.utils.checkpoint``), which must
    not move the running statistics a second time. Compiled graphs never re-run Python here."""
    if torch.compiler.is_compiling():
        return False
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


class _Statistics:
    """Scratch running statistics for a checkpointed site: the update happens on copies inside
    the checkpoint and is written back outside it, so the checkpointed function mutates nothing
    it did not create (which ``torch.compile`` requires) and its recomputation changes nothing."""

    def __init__(self, state: SiteState) -> None:
        self.channels = state.channels
        self.running_mean = state.running_mean.clone()
        self.running_var = state.running_var.clone()


def _find_submodule(root: nn.Module, name: str) -> nn.Module | None:
    module: Any = root
    for part in name.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return cast(nn.Module, module)


def _drop_own_missing_keys(module: nn.Module, incompatible_keys: Any) -> None:
    """Let a plain host checkpoint load strictly into a wrapped host: phi's keys may be absent.

    The keys carry the prefix of wherever the host sits in the model being loaded (a wrapped
    backbone inside a larger model), so they are matched by their MetaPerturb suffix."""
    controller = getattr(module, ATTRIBUTE, None)
    if not isinstance(controller, MetaPerturb):
        return
    own = {f"{ATTRIBUTE}.{key}" for key in controller.state_dict()}
    missing = incompatible_keys.missing_keys
    suffixes = tuple(f".{key}" for key in own)
    missing[:] = [key for key in missing if key not in own and not key.endswith(suffixes)]


class MetaPerturb(nn.Module):
    """The state MetaPerturb adds to a host: phi, one :class:`SiteState` per site, the strength.

    Reach it with ``model.metaperturb`` or :func:`get_controller`. Its mode follows the host's
    ``train()`` / ``eval()``: batch statistics and sampled noise in training, running statistics
    and :attr:`eval_mode` in eval.
    """

    strength: Tensor
    input_height: Tensor

    def __init__(
        self,
        phi: Perturbation,
        plan: SitePlan,
        *,
        channel_norm: float | None = None,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        self.phi = phi
        self.plan = plan
        self.site_names = [site.name for site in plan.sites]
        self.sites = nn.ModuleList([SiteState(site.channels) for site in plan.sites])
        norm = channel_norm or phi.config.channel_norm or plan.widest
        self.channel_ratios = [site.channels / norm for site in plan.sites]
        #: Annealing coefficient c in ``g = (s*z - 1) * c + 1``; a tensor so that changing it
        #: every step does not recompile a ``torch.compile``d host.
        self.register_buffer("strength", torch.ones(()))
        self.register_buffer("input_height", torch.zeros(()), persistent=False)
        #: False turns every site into the identity without removing hooks (see :func:`disabled`).
        self.enabled = True
        #: Indices of the sites switched off after ``wrap`` (:func:`exclude_sites`): each passes
        #: its features unchanged. In the ``state_dict`` (``_extra_state``), so that a reloaded
        #: model keeps them off.
        self.excluded_sites: set[int] = set()
        #: What the sites do in eval mode: "expectation" (default), "sample" or "off".
        self.eval_mode: EvalMode = "expectation"
        #: Keep only each site's input for backward and recompute phi there (see ``wrap``).
        self.memory_efficient = memory_efficient
        #: The function applied at each site (``benchmarks/overhead.py`` swaps in the reference).
        self.site_function: Callable[..., Tensor] = perturb
        #: Handles of the hooks ``wrap`` registered, removed by ``unwrap``.
        self.handles: list[RemovableHandle] = []
        #: The module of each site, as hooked by ``wrap`` (a plain list: not submodules).
        self.site_modules: list[nn.Module] = []
        #: Names ``wrap`` added to the host's DistributedDataParallel ignore list (frozen phi).
        self.ddp_ignored: list[str] | None = None

    def get_extra_state(self) -> Tensor:
        """Which sites :func:`exclude_sites` switched off, one bool per site (a tensor, so that
        the host's ``state_dict`` still saves with safetensors)."""
        return torch.tensor([i in self.excluded_sites for i in range(len(self.sites))])

    def set_extra_state(self, state: Any) -> None:
        if not (
            isinstance(state, Tensor)
            and state.dtype == torch.bool
            and state.shape == (len(self.sites),)
        ):
            raise ValueError(
                f"this checkpoint's MetaPerturb site switches ({ATTRIBUTE}._extra_state) are not "
                f"{len(self.sites)} bools, one per site of this model: it was saved from a model "
                "wrapped with other sites. Wrap the same network with the same sites= and "
                "exclude= before loading it."
            )
        self.excluded_sites = {int(i) for i in state.nonzero().flatten().tolist()}

    def forward(self, x: Any) -> Any:
        """The identity. ``wrap`` appends this module as the host's last child, and a host that
        runs its children in order (an ``nn.Sequential``) calls it after its own last layer."""
        return x

    def check_sites(self, host: nn.Module) -> None:
        """Raise :class:`ModelChangedError` if a site's module was replaced after ``wrap``.

        The replacement carries no hook, so without this check its site would silently stop
        perturbing. A few attribute lookups per forward pass, not per site call.
        """
        for name, module in zip(self.site_names, self.site_modules, strict=False):
            if _find_submodule(host, name) is not module:
                raise ModelChangedError(
                    f"the MetaPerturb site {name!r} no longer holds the module wrap() hooked "
                    "(it was replaced or removed after wrap), so phi would silently stop being "
                    "applied there. Call metaperturb.unwrap(model) and wrap it again after "
                    "changing the model."
                )

    def apply_site(self, index: int, h: Tensor) -> Tensor:
        """Perturb the output ``h`` of site ``index`` (called by the site's forward hook)."""
        if not self.enabled or index in self.excluded_sites:
            return h
        if isinstance(h, torch.fx.Proxy):
            raise TypeError(
                "torch.fx symbolic tracing (e.g. torchvision's create_feature_extractor) cannot "
                "trace MetaPerturb's sites, which depend on the input's size: trace the model "
                "before wrap(), or use torch.export / torch.compile, which support wrapped models."
            )
        spatial_norm = self.phi.config.spatial_norm
        height = float(h.shape[-2])
        spatial_ratio = (
            self.input_height.new_full((), height / spatial_norm)
            if spatial_norm is not None
            else height / self.input_height.clamp(min=1.0)
        )
        state = cast(SiteState, self.sites[index])
        # With autograd on, a copy: a scheduler may change the strength between this forward
        # and its backward, which saves it.
        strength = self.strength.clone() if torch.is_grad_enabled() else self.strength

        def site(features: Tensor, statistics: Any, update: bool) -> Tensor:
            return self.site_function(
                features,
                self.phi,
                statistics,
                strength=strength,
                channel_ratio=self.channel_ratios[index],
                spatial_ratio=spatial_ratio,
                training=self.training,
                eval_mode=self.eval_mode,
                update_statistics=update,
            )

        # Only training moves the statistics, and never a recomputation in backward.
        update = self.training and not _recomputing_in_backward()
        if self.memory_efficient and self.training and torch.is_grad_enabled():

            def checkpointed(features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
                scratch = _Statistics(state)
                return site(features, scratch, True), scratch.running_mean, scratch.running_var

            result, mean, var = checkpoint(checkpointed, h, use_reentrant=False)
            if update:
                state.running_mean.copy_(mean)
                state.running_var.copy_(var)
            return cast(Tensor, result)
        return site(h, state, update)

    def extra_repr(self) -> str:
        text = f"sites={len(self.sites)}, eval_mode={self.eval_mode!r}, enabled={self.enabled}"
        if self.excluded_sites:
            text += f", excluded={[self.site_names[i] for i in sorted(self.excluded_sites)]}"
        return text


def is_wrapped(model: nn.Module) -> bool:
    """Whether ``model`` carries MetaPerturb sites."""
    return isinstance(getattr(model, ATTRIBUTE, None), MetaPerturb)


def get_controller(model: nn.Module) -> MetaPerturb:
    """The :class:`MetaPerturb` of a wrapped model (unwrapping DDP and ``torch.compile``)."""
    for candidate in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        controller = getattr(candidate, ATTRIBUTE, None)
        if isinstance(candidate, nn.Module) and isinstance(controller, MetaPerturb):
            return controller
    raise NotWrappedError(
        f"{type(model).__name__} is not wrapped by MetaPerturb: call metaperturb.wrap(model) first."
    )


#: Controllers currently attached to a host, to tell when one phi object serves several hosts.
_ATTACHED: weakref.WeakSet[MetaPerturb] = weakref.WeakSet()


def _check_shared_phi(perturbation: Perturbation, trainable: bool) -> None:
    """One phi object in two wrapped models is one set of weights: freezing it for the second
    would silently stop the first from learning it (or the reverse)."""
    if perturbation.frozen == (not trainable):
        return
    if any(other.phi is perturbation for other in _ATTACHED):
        wanted, held = ("trainable", "frozen") if trainable else ("frozen", "trainable")
        raise ValueError(
            f"this phi is already attached {held} to another wrapped model; wrapping it "
            f"{wanted} here would make it {wanted} there too. Pass a copy instead "
            "(wrap(model, copy.deepcopy(phi), ...)) or wrap both with the same trainable=."
        )


def _ignore_frozen_phi_in_ddp(model: nn.Module, controller: MetaPerturb) -> None:
    """A frozen phi never gets a gradient (its weights are detached), even after a host-wide
    ``requires_grad_(True)``; DistributedDataParallel would then stop at the next step with
    "parameters that were not used in producing loss". Its ignore list (read when DDP wraps
    the model) leaves phi's parameters out of the gradient reduction."""
    names = [f"{ATTRIBUTE}.phi.{name}" for name, _ in controller.phi.named_parameters()]
    previous = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = previous + [  # type: ignore[assignment]
        name for name in names if name not in previous
    ]
    controller.ddp_ignored = [name for name in names if name not in previous]


def _resolve_phi(
    phi: Perturbation | str | os.PathLike[str] | None, revision: str | None
) -> Perturbation:
    if revision is not None and (phi is None or isinstance(phi, Perturbation)):
        warnings.warn(
            f"revision={revision!r} only applies to a Hub repository given as phi (phi="
            '"org/name"); it is ignored for '
            f"{'the bundled phi*' if phi is None else 'a Perturbation'}.",
            stacklevel=3,
        )
    if isinstance(phi, Perturbation):
        return phi
    from . import hub

    if phi is None:
        return hub.load_default_phi()
    return hub.load_phi(phi, revision=revision)


def wrap(
    model: nn.Module,
    phi: Perturbation | str | os.PathLike[str] | None = None,
    *,
    sites: Strategy | Sequence[str] = "block",
    trainable: bool = False,
    input_size: Sequence[int] | None = None,
    channel_norm: float | None = None,
    revision: str | None = None,
    memory_efficient: bool = False,
    placement: Placement | None = None,
    exclude: Sequence[str] = (),
) -> nn.Module:
    """Apply MetaPerturb after every block of ``model``; returns the same model, wrapped.

    Args:
        model: a timm / torchvision CNN or any ``nn.Module`` taking a (B, C, H, W) batch.
        phi: the perturbation function: a :class:`Perturbation`, a Hub repo id, a local folder or
            ``.safetensors`` file; ``None`` loads the meta-trained phi* bundled with the package.
        sites: ``"block"`` (after every block, the paper's choice), ``"stage"`` (after the last
            block of each stage), or explicit module names.
        trainable: let phi learn (meta-training). By default phi is frozen: an optimizer over
            ``model.parameters()`` leaves it unchanged.
        input_size: (C, H, W) for the planning pass; see :func:`metaperturb.inspect`.
        channel_norm: divisor of the channel descriptor; default: phi's config, else the widest
            site of this model.
        revision: Hub revision (branch, tag or commit) when ``phi`` is a repo id.
        memory_efficient: keep only each site's input for the backward pass and recompute phi
            there (activation checkpointing of the sites): much less memory, one more phi
            forward per step. Same values and gradients. For the PyTorch path (GPU, other
            dtypes, autocast); the fused CPU kernels keep only the input already.
        placement: ``"output"`` (phi perturbs what each block returns) or
            ``"before_activation"`` (the input of the block's final activation module where
            there is one, as in the authors' ResNets; elsewhere the output). Since the gain is
            positive, ``act(h * g) = act(h) * g`` for ReLU: the two differ in what phi sees.
            Default: where phi was meta-trained (``phi.config.placement``).
        exclude: sites ``sites`` finds that go without phi, by module name (as
            :func:`metaperturb.inspect` lists them): e.g. one where phi's channel scale closes
            (:class:`~metaperturb.ClosedSiteWarning`). The others stay as they would be.

    Raises:
        AlreadyWrappedError: ``model`` is already wrapped.
        NoSitesError: no module of ``model`` can take phi, or ``exclude`` names a non-site.

    Example:
        >>> import timm, metaperturb
        >>> model = timm.create_model("resnet18", num_classes=10)
        >>> model = metaperturb.wrap(model, phi=metaperturb.Perturbation())  # doctest: +SKIP
    """
    inner = getattr(model, "module", None)  # DistributedDataParallel, DataParallel
    if is_wrapped(model) or (isinstance(inner, nn.Module) and is_wrapped(inner)):
        raise AlreadyWrappedError(
            f"{type(model).__name__} is already wrapped by MetaPerturb; call metaperturb.unwrap(model) first."
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap() takes an nn.Module, got {type(model).__name__}.")
    if type(model).__name__ in ("DistributedDataParallel", "DataParallel", "OptimizedModule"):
        raise TypeError(
            f"wrap() got a {type(model).__name__}: wrap the plain model first, then apply "
            "DistributedDataParallel / torch.compile to the wrapped model."
        )
    if channel_norm is not None and not (math.isfinite(channel_norm) and channel_norm > 0):
        raise ValueError(
            f"channel_norm must be a positive number (the channel count that maps to 1), got "
            f"{channel_norm!r}; leave it out to use phi's own or this model's widest site."
        )
    if not isinstance(sites, str):
        repeated = sorted(name for name, count in Counter(sites).items() if count > 1)
        if repeated:
            raise ValueError(f"sites lists {repeated} more than once: name each module once.")
    perturbation = _resolve_phi(phi, revision)
    _check_shared_phi(perturbation, trainable)
    where = placement or cast(Placement, perturbation.config.placement)
    plan = plan_sites(
        model, strategy=sites, input_size=input_size, placement=where, exclude=exclude
    )
    perturbation.freeze(not trainable)
    reference = next(iter(model.parameters()), None)
    controller = MetaPerturb(
        perturbation, plan, channel_norm=channel_norm, memory_efficient=memory_efficient
    )
    if reference is not None:
        controller.to(
            device=reference.device,
            dtype=reference.dtype if reference.is_floating_point() else None,
        )
    controller.train(model.training)
    model.add_module(ATTRIBUTE, controller)
    _sequential_host.adopt(model, ATTRIBUTE)
    _ATTACHED.add(controller)
    if not trainable:
        _ignore_frozen_phi_in_ddp(model, controller)

    modules = dict(model.named_modules())
    handles = []
    for index, site in enumerate(plan.sites):
        if site.hook == "input":
            hook = _SiteInputHook(controller, index, site.call)
            # Registered first, so that a site on the block itself resets before it counts.
            handles.append(modules[site.block].register_forward_pre_hook(_CountReset(hook)))
            handles.append(modules[site.name].register_forward_pre_hook(hook))
        else:
            handles.append(modules[site.name].register_forward_hook(_SiteHook(controller, index)))
    handles.append(model.register_forward_pre_hook(_CheckSitesHook(controller)))
    handles.append(modules[plan.stem or ""].register_forward_pre_hook(_HeightHook(controller)))
    handles.append(model.register_load_state_dict_post_hook(_drop_own_missing_keys))
    controller.handles = handles
    controller.site_modules = [modules[name] for name in controller.site_names]
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Remove every hook and module ``wrap`` added; returns the same model, as it was."""
    given = model
    inner = getattr(model, "_orig_mod", None)  # torch.compile's module: undo the model in it
    if isinstance(inner, nn.Module):
        model = inner
    controller = get_controller(model)
    if not is_wrapped(model):
        raise NotWrappedError(
            "unwrap() needs the wrapped model itself, not a DistributedDataParallel or compiled "
            "wrapper around it: call metaperturb.unwrap(ddp.module)."
        )
    while controller.handles:
        controller.handles.pop().remove()
    if controller.ddp_ignored is not None:
        listed: list[str] = getattr(model, "_ddp_params_and_buffers_to_ignore", [])
        kept = [name for name in listed if name not in controller.ddp_ignored]
        if kept:
            model._ddp_params_and_buffers_to_ignore = kept  # type: ignore[assignment]
        else:
            del model._ddp_params_and_buffers_to_ignore
    _ATTACHED.discard(controller)
    delattr(model, ATTRIBUTE)
    _sequential_host.release(model)
    return given


def inspect(
    model: nn.Module,
    *,
    sites: Strategy | Sequence[str] = "block",
    input_size: Sequence[int] | None = None,
    placement: Placement = "output",
    exclude: Sequence[str] = (),
) -> SitePlan:
    """The plan ``wrap`` would follow (or follows, for a wrapped model): print it to read it.

    Lists each site with its channels and spatial size, and every module left out with the
    reason. Raises :class:`~metaperturb.errors.NoSitesError` when no module can take phi.

    Example:
        >>> import torchvision, metaperturb
        >>> print(metaperturb.inspect(torchvision.models.resnet18(), input_size=(3, 64, 64)))  # doctest: +SKIP
    """
    if is_wrapped(model):
        return get_controller(model).plan
    return plan_sites(
        model, strategy=sites, input_size=input_size, placement=placement, exclude=exclude
    )


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` without perturbation inside the block; the hooks stay in place.

    Flipping a flag rather than removing hooks keeps a ``torch.compile``d model valid (it
    recompiles once for the other value of the flag).
    """
    controller = get_controller(model)
    previous = controller.enabled
    controller.enabled = False
    try:
        yield model
    finally:
        controller.enabled = previous


def exclude_sites(model: nn.Module, names: Sequence[str]) -> None:
    """Switch phi off at these sites from now on, in training and in eval: each passes its
    features unchanged, the others go on as before.

    The counterpart of ``wrap(..., exclude=...)`` for a site found during training to close
    (:class:`~metaperturb.ClosedSiteWarning`; ``StrengthScheduler(..., on_closed_site="exclude")``
    calls it). Kept in the model's ``state_dict``, so a checkpoint reloads with the same sites
    off; the hooks stay, so a ``torch.compile``d model recompiles once rather than breaking.
    """
    controller = get_controller(model)
    unknown = sorted(set(names) - set(controller.site_names))
    if unknown:
        raise NoSitesError(
            f"exclude_sites: {unknown} are not sites of this model; its sites are "
            f"{controller.site_names} (metaperturb.inspect(model) lists them)."
        )
    controller.excluded_sites |= {controller.site_names.index(name) for name in names}


def set_eval_mode(model: nn.Module, mode: EvalMode) -> None:
    """Choose what the sites do in eval mode: ``"expectation"``, ``"sample"`` or ``"off"``."""
    if mode not in _EVAL_MODES:
        raise ValueError(f"eval mode must be one of {_EVAL_MODES}, got {mode!r}.")
    get_controller(model).eval_mode = mode


def set_strength(model: nn.Module, strength: float) -> None:
    """Set the annealing coefficient c in [0, 1] (0: no perturbation, 1: full)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], got {strength!r}.")
    get_controller(model).strength.fill_(strength)
