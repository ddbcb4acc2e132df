"""The on-disk phi: a strict reader and an atomic writer for model.safetensors and config.json.

A saved phi is ``model.safetensors`` (the 82 numbers, fp32, with the config and a format version
in its header, so a lone file keeps them) beside ``config.json``. Reading is strict, since a
regularizer that silently loads half its weights still trains, just badly: every tensor must be
present with its exact shape, finite and floating point, and nothing else may be in the file.
Files are never unpickled. Writing goes through temporary files moved into place only once all
were written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn

from ._atomic import fsync_directory, write_temporary
from ._version import __version__
from .errors import PhiFormatError
from .phi import Perturbation, PerturbationConfig

__all__ = [
    "CONFIG_NAME",
    "CONVERT_HINT",
    "FORMAT_VERSION",
    "MODEL_CARD_NAME",
    "PROVENANCE_KEYS",
    "UNKNOWN",
    "WEIGHTS_NAME",
    "config_bytes",
    "fingerprint",
    "load_file",
    "validate_tensors",
    "weights_bytes",
    "write_folder",
]

#: Version of the on-disk layout this library writes and the newest one it reads.
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MODEL_CARD_NAME = "README.md"
#: Metadata keys always in the header (``UNKNOWN`` where the user gave none).
PROVENANCE_KEYS = ("source_dataset", "source_architecture")
UNKNOWN = "unknown"
CONVERT_HINT = (
    "metaperturb never unpickles files (unpickling can run arbitrary code). If this is the "
    "authors' MetaPerturb checkpoint (perturb_750.pth), convert it once with "
    "`python -m metaperturb.convert IN.pth OUT_DIR` (see metaperturb.convert) and load OUT_DIR."
)

# safetensors header keys written by metaperturb itself (the rest of the header metadata is the
# user's ``config.metadata``).
_FORMAT_KEY = "metaperturb_format_version"
_CONFIG_KEY = "metaperturb_config"
_RESERVED_HEADER_KEYS = frozenset({"format", _FORMAT_KEY, _CONFIG_KEY})
# phi holds 82 numbers (about 1 KB as safetensors); anything far larger is not a phi and is not
# read into memory.
_MAX_FILE_BYTES = 16 * 1024 * 1024


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def weights_bytes(phi: Perturbation) -> bytes:
    """``model.safetensors``: phi's tensors as fp32, its metadata and config in the header."""
    header = _checked_metadata(phi.config.metadata)
    for key in PROVENANCE_KEYS:
        header.setdefault(key, UNKNOWN)
    header.update(
        {
            "format": "pt",
            _FORMAT_KEY: str(FORMAT_VERSION),
            _CONFIG_KEY: json.dumps(phi.config.to_dict(), sort_keys=True),
        }
    )
    tensors = {
        name: tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
        for name, tensor in phi.state_dict().items()
    }
    # Refused here rather than on loading: a published phi nobody can load is worse than none.
    nonfinite = [name for name, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]
    if nonfinite:
        raise ValueError(
            f"phi's {', '.join(nonfinite)} hold NaN or infinite values (it diverged while "
            "training), so nothing was written; save a phi from before the divergence."
        )
    return safetensors_save(tensors, metadata=header)


def fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's ``state_dict`` (fp32, in its order, with the names): for phi, its
    82 numbers.

    Names which phi made a result even after the file it came from was replaced; unlike a hash
    of ``model.safetensors`` it ignores the header (metadata, format version). Of a trained
    network, it tells whether two codes or machines trained the same one (``replay.py``).
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to(device="cpu", dtype=torch.float32).numpy().tobytes())
    return digest.hexdigest()


def config_bytes(config: PerturbationConfig) -> bytes:
    """``config.json``: the config plus the format version."""
    payload = {**config.to_dict(), "format_version": FORMAT_VERSION, "library_name": "metaperturb"}
    return (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _checked_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    bad = [
        key
        for key, value in metadata.items()
        if not isinstance(key, str) or not isinstance(value, str)
    ]
    if bad:
        raise TypeError(
            f"phi.config.metadata must map strings to strings (it goes into the safetensors "
            f"header); the entries {bad!r} are not: convert them with str()."
        )
    return dict(metadata)


def write_folder(directory: Path, files: Mapping[str, bytes]) -> Path:
    """Write ``files`` into ``directory`` (created if needed), all of them or none.

    Every file is written to a temporary sibling first and moved into place with ``os.replace``
    only once all of them were written, so an error while writing (disk full, interrupt) leaves
    the previous files intact, no partial file behind, and no folder that did not exist before.
    The moves are one ``os.replace`` each, not one for the folder: a crash between two of them,
    a window of microseconds, would leave some files new and some old.
    """
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    temporaries: dict[str, Path] = {}
    try:
        for name, data in files.items():
            temporaries[name] = write_temporary(directory, name, data)
        for name, temporary in temporaries.items():
            os.replace(temporary, directory / name)
    except BaseException:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only succeeds if nothing of ours is left in it
        raise
    fsync_directory(directory)
    return directory


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def load_file(weights: Path, config_path: Path | None) -> Perturbation:
    """Load phi from ``weights``, its config from ``config_path``, else the header, else default."""
    tensors, header = _read_safetensors(weights)
    _check_format_version(header.get(_FORMAT_KEY), f"{weights} (header {_FORMAT_KEY!r})")
    config = _config_from(config_path, header, weights)
    with torch.random.fork_rng(devices=[]):  # building phi must not move the caller's RNG
        phi = Perturbation(config)
    expected = {name: tuple(t.shape) for name, t in phi.state_dict().items()}
    phi.load_state_dict(validate_tensors(tensors, expected, source=str(weights)), strict=True)
    return phi


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Parse a safetensors file defensively: size, header length and JSON before the tensors."""
    size = path.stat().st_size
    if size > _MAX_FILE_BYTES:
        raise PhiFormatError(
            f"{path} is {size} bytes; a phi holds 82 numbers (about 1 KB). This is not a "
            "metaperturb phi file."
        )
    data = path.read_bytes()

    def invalid(reason: str) -> PhiFormatError:
        if _looks_pickled(data):
            hint = CONVERT_HINT
        else:
            hint = "Save phi with metaperturb.hub.save_pretrained to get a valid file."
        return PhiFormatError(f"{path} is not a valid safetensors file ({reason}). {hint}")

    if len(data) < 8:
        raise invalid(f"{len(data)} bytes, shorter than the 8-byte header length")
    (header_length,) = struct.unpack("<Q", data[:8])
    if header_length > len(data) - 8:
        raise invalid(
            f"the header claims {header_length} bytes but the file has only {len(data) - 8} "
            "after the length field: truncated or not safetensors"
        )
    try:
        header = json.loads(data[8 : 8 + header_length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise invalid("the header is not JSON") from None
    except RecursionError:  # e.g. "[[[[...": Python's JSON parser recurses per nesting level
        raise invalid("the header is JSON nested too deeply to be a safetensors header") from None
    if not isinstance(header, dict):
        raise invalid("the header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise invalid("the header's __metadata__ is not a map of strings")
    try:
        tensors = safetensors_load(data)
    except (SafetensorError, ValueError, TypeError, RuntimeError) as error:
        raise invalid(str(error)) from None
    return tensors, metadata


def _looks_pickled(data: bytes) -> bool:
    # torch.save writes a zip archive (since torch 1.6) or a bare pickle (protocol 2 to 5).
    return data[:4] == b"PK\x03\x04" or (len(data) > 1 and data[0] == 0x80 and 2 <= data[1] <= 5)


def _check_format_version(value: object, where: str) -> None:
    if value is None:
        return  # a file not written by metaperturb: the tensor checks decide
    try:
        version = int(str(value))
    except ValueError:
        raise PhiFormatError(
            f"{where}: format version {value!r} is not an integer; the file is damaged. "
            "Save phi again with save_pretrained."
        ) from None
    if version > FORMAT_VERSION:
        raise PhiFormatError(
            f"{where}: written by a newer metaperturb (format version {version}; this version "
            f"{__version__} reads up to {FORMAT_VERSION}). To load it, upgrade metaperturb "
            "(`pip install -U metaperturb`)."
        )
    if version < 1:
        raise PhiFormatError(
            f"{where}: format version {version} does not exist; the file is damaged."
        )


def _config_from(
    config_path: Path | None, header: Mapping[str, str], weights: Path
) -> PerturbationConfig:
    """config.json if given, else the config in the header, else the default one."""
    header_metadata = {
        key: value
        for key, value in header.items()
        if key not in _RESERVED_HEADER_KEYS and not (key in PROVENANCE_KEYS and value == UNKNOWN)
    }
    if config_path is not None:
        where = str(config_path)
        try:
            data = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise PhiFormatError(
                f"{where} is not valid JSON ({error}). Save phi again with save_pretrained."
            ) from None
        if not isinstance(data, dict):
            raise PhiFormatError(f"{where} must hold a JSON object, got {type(data).__name__}.")
        _check_format_version(data.pop("format_version", None), where)
        data.pop("library_name", None)
    elif _CONFIG_KEY in header:
        where = f"{weights} (header {_CONFIG_KEY!r})"
        try:
            data = json.loads(header[_CONFIG_KEY])
        except (json.JSONDecodeError, RecursionError):
            raise PhiFormatError(f"{where} is not valid JSON; the file is damaged.") from None
        if not isinstance(data, dict):
            raise PhiFormatError(f"{where} must hold a JSON object; the file is damaged.")
    else:
        return PerturbationConfig(metadata=header_metadata)
    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PhiFormatError(f"{where}: 'metadata' must be a JSON object of strings.")
    data["metadata"] = {**header_metadata, **metadata}
    try:
        return PerturbationConfig.from_dict(data)
    except (TypeError, ValueError) as error:
        raise PhiFormatError(f"{where}: {error}") from None


def validate_tensors(
    tensors: Mapping[str, Tensor],
    expected: Mapping[str, tuple[int, ...]],
    *,
    source: str,
) -> dict[str, Tensor]:
    """Check a state dict against the expected names and shapes; return it as fp32.

    Every problem is collected and reported at once, each naming the tensor and the fix.
    """
    problems = [
        f"missing tensor {name!r} (shape {_shape(shape)})"
        for name, shape in expected.items()
        if name not in tensors
    ]
    problems += [
        f"unexpected tensor {name!r}: a phi holds only {sorted(expected)}"
        for name in tensors
        if name not in expected
    ]
    checked: dict[str, Tensor] = {}
    for name, shape in expected.items():
        tensor = tensors.get(name)
        if tensor is None:
            continue
        if tuple(tensor.shape) != shape:
            problems.append(
                f"tensor {name!r} has shape {_shape(tuple(tensor.shape))}, expected {_shape(shape)}"
            )
            continue
        if not tensor.is_floating_point():
            problems.append(
                f"tensor {name!r} has dtype {tensor.dtype}; phi's weights are floating point "
                "(save them as float32)"
            )
            continue
        value = tensor.to(torch.float32)
        if not bool(torch.isfinite(value).all()):
            problems.append(
                f"tensor {name!r} holds NaN or infinite values (the phi diverged while training; "
                "save a phi from before the divergence)"
            )
            continue
        checked[name] = value.contiguous()
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems)
        raise PhiFormatError(
            f"{source} is not a valid metaperturb phi:\n{listed}\n"
            "Save phi with metaperturb.hub.save_pretrained, which writes exactly these tensors."
        )
    return checked


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(n) for n in shape) + ")"
