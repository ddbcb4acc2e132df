"""Convert the authors' published phi (a legacy torch pickle) to a metaperturb phi.

The MetaPerturb authors released their meta-trained phi as ``perturb_750.pth``, a ``torch.save``
of their ``Perturb`` module's state dict. It is read here, once, with ``torch.load(...,
weights_only=True)`` (which refuses arbitrary objects), mapped onto :class:`Perturbation`, and
written as safetensors, so nothing downstream ever unpickles.

The file carries no licence: a converted copy is for local comparison and must not be
redistributed (the converted phi's metadata and model card say so).

Usage::

    python -m metaperturb.convert perturb_750.pth converted-phi/
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ._serialization import validate_tensors
from .errors import MetaPerturbError, PhiFormatError, PhiNotFoundError
from .hub import save_pretrained
from .phi import Perturbation, PerturbationConfig

__all__ = ["OFFICIAL_KEY_MAP", "convert_official_checkpoint", "main"]

#: The authors' state-dict key -> ours. Their two channel-equivariant ops ``phi_1``/``phi_2`` are
#: our ``noise_in``/``noise_out``; ``w_identity`` (the per-channel kernel) is ``self_weight`` and
#: ``w_all`` (the kernel on the channel mean) is ``mean_weight``. Both ops compute the same function
#: as ours: ``w_all`` is convolved with the mean over channels (not the sum) and the result is
#: added to every channel, itself included, with no bias.
#:
#: ``fc.weight`` needs no permutation: the authors' 10 scale features are, in order, the batch
#: mean of the 4 pooled maps, their batch variance, ``C / channel_norm`` and ``H / spatial_norm``
#: (the ``torch.cat`` order in their ``Perturb.forward``), which is our order; their pooled maps
#: come from ``kernel.repeat(C, 1, 1, 1)`` in a grouped conv viewed as (B, C, 4), as ours do.
OFFICIAL_KEY_MAP: dict[str, str] = {
    "phi_1.w_identity": "noise_in.self_weight",
    "phi_1.w_all": "noise_in.mean_weight",
    "phi_2.w_identity": "noise_out.self_weight",
    "phi_2.w_all": "noise_out.mean_weight",
    "kernel": "scale_kernels",
    "fc.weight": "scale_weight",
}
_OFFICIAL_SHAPES: dict[str, tuple[int, ...]] = {
    "phi_1.w_identity": (1, 1, 3, 3),
    "phi_1.w_all": (1, 1, 3, 3),
    "phi_2.w_identity": (1, 1, 3, 3),
    "phi_2.w_all": (1, 1, 3, 3),
    "kernel": (4, 1, 3, 3),
    "fc.weight": (1, 10),
}
_SOURCE = (
    "official MetaPerturb checkpoint (Ryu et al. 2020), converted; no licence: do not redistribute"
)
_PROVENANCE = (
    "Converted with `python -m metaperturb.convert` from the authors' published phi "
    "(`checkpoints/src/tiny_imagenet_resnet20_final/perturb_750.pth` in "
    "https://github.com/JWoong148/MetaPerturb): meta-trained for 750 steps on Tiny ImageNet "
    "(32x32) with ResNet20 task networks, phi applied to the pre-activation output of each "
    "residual block. **The authors' repository carries no licence: do not redistribute these "
    "weights.** Use them for local comparison only."
)


def convert_official_checkpoint(path: str | os.PathLike[str]) -> Perturbation:
    """Read the authors' ``perturb_750.pth`` and return the same phi as a :class:`Perturbation`.

    Args:
        path: The authors' checkpoint (a ``torch.save`` of their ``Perturb`` state dict).

    Returns:
        phi with the authors' weights and provenance metadata, ready for
        :func:`metaperturb.hub.save_pretrained`.

    Raises:
        PhiNotFoundError: ``path`` does not exist.
        PhiFormatError: The file is not a state dict of exactly the authors' six tensors.

    Example:
        >>> phi = convert_official_checkpoint("perturb_750.pth")  # doctest: +SKIP
        >>> save_pretrained(phi, "official-phi")  # doctest: +SKIP
    """
    source = Path(path)
    if not source.is_file():
        raise PhiNotFoundError(f"No checkpoint at {str(source)!r}: no such file.")
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        raise PhiFormatError(
            f"{source} could not be read as a torch checkpoint of plain tensors ({error}). "
            "Expected the authors' perturb_750.pth (a torch.save of their Perturb state dict)."
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, Tensor) for key, value in state.items()
    ):
        raise PhiFormatError(
            f"{source} holds a {type(state).__name__}, not a state dict of tensors; expected "
            f"the authors' Perturb state dict with keys {sorted(_OFFICIAL_SHAPES)}."
        )
    checked = validate_tensors(state, _OFFICIAL_SHAPES, source=f"{source} (authors' format)")
    metadata = {
        "source": _SOURCE,
        "source_dataset": "tiny-imagenet",
        "source_architecture": "resnet20 (pre-activation features)",
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
    }
    # channel_norm / spatial_norm stay None (the host's widest site, the input height): for the
    # authors' ResNet20 at 32 px these are exactly their 64 and 32.
    # Their phi acted on the residual sum before each block's last ReLU: wrap puts it there
    # by default, where the host's blocks allow.
    phi = Perturbation(PerturbationConfig(metadata=metadata, placement="before_activation"))
    phi.load_state_dict({ours: checked[theirs] for theirs, ours in OFFICIAL_KEY_MAP.items()})
    return phi


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m metaperturb.convert IN.pth OUT_DIR``: convert and save with save_pretrained."""
    parser = argparse.ArgumentParser(
        prog="python -m metaperturb.convert",
        description="Convert the authors' MetaPerturb phi (perturb_750.pth) to a metaperturb "
        "phi folder (safetensors + config + model card). The result must not be redistributed.",
    )
    parser.add_argument("checkpoint", type=Path, help="the authors' perturb_750.pth")
    parser.add_argument("output", type=Path, help="folder to write (created if needed)")
    args = parser.parse_args(argv)
    try:
        phi = convert_official_checkpoint(args.checkpoint)
        folder = save_pretrained(phi, args.output, provenance=_PROVENANCE, license="other")
    except MetaPerturbError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Converted {args.checkpoint} -> {folder} (for local use only: do not redistribute).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
