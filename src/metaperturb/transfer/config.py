"""What defines one evaluation run (:class:`TransferConfig`) and the id that names its files."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TransferConfig", "closed_site_suffix", "phi_label", "run_id"]


@dataclass
class TransferConfig:
    """Everything that defines one run; its :func:`run_id` names the result file."""

    #: A preset name (``s-cifar10``, ``s-fashion-mnist``, ``mnist-10k``, ``omniglot-100``) or a
    #: :class:`~.targets.Target` as a dict.
    target: str | dict[str, Any]
    #: Folder holding the presets' datasets (``../shared/data`` here).
    data_root: str | None = None
    #: The network (a timm name; the project's cifar_resnet20 & co. included).
    model: str = "cifar_resnet20"
    #: MetaPerturb's phi: ``None`` (not used), ``"default"`` (the bundled phi*), a folder, a
    #: ``.safetensors`` file or a Hub id.
    phi: str | None = None
    #: A label for ``phi`` in the run id and tables (default: derived from the path).
    phi_name: str | None = None
    #: What phi perturbs (:func:`metaperturb.wrap`'s ``placement``): ``"output"`` or
    #: ``"before_activation"``.
    placement: str = "output"
    #: phi's strength ramps from 0 to 1 over this fraction of the steps (METHOD.md: 0.4, the
    #: authors' code; 0: full strength from the first step). Named in the run id when not 0.4.
    ramp_fraction: float = 0.4
    #: Sites left without phi (:func:`metaperturb.wrap`'s ``exclude``): e.g. one whose channel
    #: scale closes (:class:`~metaperturb.ClosedSiteWarning`). Named in the run id.
    exclude: list[str] = field(default_factory=list)
    #: What the strength scheduler does about a site whose channel scale closes during training
    #: (:class:`~metaperturb.StrengthScheduler`): ``"warn"``, the method as published and what
    #: every run before this setting did, or ``"exclude"`` it from then on, the library's
    #: default since (named in the run id as ``exclude-closed``).
    on_closed_site: str = "warn"
    #: With ``on_closed_site="exclude"``: the strength from which a closed site is switched off
    #: (:class:`~metaperturb.StrengthScheduler`'s ``exclude_from``); before it a closed site is
    #: only recorded, so one that reopens stays on. Named in the run id when not 0
    #: (``exclude-closed-from0.5``).
    exclude_closed_from: float = 0.0
    #: DropBlock rate and block size (rate 0: not used).
    dropblock_rate: float = 0.0
    dropblock_size: int = 3
    #: Manifold Mixup's alpha (0: not used).
    mixup_alpha: float = 0.0
    #: Start from these weights (a ``.safetensors`` or ``weights_only`` torch file of the same
    #: architecture; the head is re-initialised when the class count differs): fine-tuning.
    init: str | None = None
    init_name: str | None = None
    steps: int = 10_000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 5e-4
    padding: int = 4
    flip: bool = True
    seed: int = 0
    #: Test accuracy on ``curve_images`` test images every ``curve_every`` steps (0: never).
    curve_every: int = 1000
    curve_images: int = 2000
    #: Monte-Carlo sample counts evaluated at the end, besides the default eval (MetaPerturb).
    mc_samples: list[int] = field(default_factory=list)
    #: Also evaluate phi's ``sample`` (one draw) and ``off`` eval modes (MetaPerturb).
    eval_modes: bool = True
    checkpoint_every: int = 1000
    device: str = "auto"
    #: Network and batches in channels_last. ``None``: on a CPU only, where it made the ResNet-20
    #: runs 1.2x (MetaPerturb) to 1.4x (Base) faster (one thread, this project's machine); phi's
    #: depthwise convolutions measured slower that way on a GPU. The same function, so a result
    #: is reused across layouts, but the noise is drawn in memory order: a run in another layout
    #: is another draw of the same seed.
    channels_last: bool | None = None
    #: Also write the trained network's state (``<run id>.safetensors``: the host's tensors,
    #: and phi's site statistics and switches under ``metaperturb.``), to score it again
    #: without training it again, or as the source of fine-tuning runs (which load the host's).
    save_weights: bool = False

    @property
    def method(self) -> str:
        """The method's name in run ids and tables, e.g. ``metaperturb[phi-star,pre-act]``."""
        parts = []
        if self.init is not None:
            parts.append(f"finetune[{self.init_name or Path(self.init).stem}]")
        if self.phi is not None:
            where = ",pre-act" if self.placement == "before_activation" else ""
            if self.ramp_fraction != 0.4:
                where += f",ramp{self.ramp_fraction:g}"
            where += "".join(f",without-{name}" for name in self.exclude)
            where += closed_site_suffix(self.on_closed_site, self.exclude_closed_from)
            parts.append(f"metaperturb[{self.phi_name or phi_label(self.phi)}{where}]")
        if self.dropblock_rate > 0:
            parts.append(f"dropblock[{self.dropblock_rate:g},{self.dropblock_size}]")
        if self.mixup_alpha > 0:
            parts.append(f"mixup[{self.mixup_alpha:g}]")
        return "+".join(parts) or "base"


def closed_site_suffix(on_closed_site: str, exclude_closed_from: float) -> str:
    """How a method names its closed-site setting: nothing for ``"warn"`` (as published),
    ``,exclude-closed`` and ``,exclude-closed-from0.5`` for the two switches."""
    if on_closed_site != "exclude":
        return ""
    return ",exclude-closed" + (f"-from{exclude_closed_from:g}" if exclude_closed_from else "")


def phi_label(source: str) -> str:
    """A phi's short name for run ids and tables: its folder's name, or the run folder's for a
    ``run/phi`` or ``selection/best`` folder."""
    path = Path(source)
    return path.name if path.name not in ("phi", "best", "") else path.parent.name


def run_id(config: TransferConfig) -> str:
    """A file-name-safe id from the settings that change results.

    A preset target is named by the preset; any other by its dataset's folder name and a short
    hash of the whole slice definition, so two slices of one dataset never share an id.
    """
    if isinstance(config.target, str):
        target = config.target
    else:
        # The folder's name, not its path: the same slice gets the same id on every machine.
        name = Path(str(config.target["data"])).name
        spec = json.dumps({**config.target, "data": name}, sort_keys=True)
        target = f"{name}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"
    text = f"{target}__{config.model}__{config.method}__{config.steps}steps__seed{config.seed}"
    return re.sub(r"[^A-Za-z0-9_.,+\-\[\]]", "-", text)
