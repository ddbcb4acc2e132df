"""Saving and loading phi: a safetensors folder, a single file, the Hub, or the bundled phi*.

A saved phi is a folder with ``model.safetensors`` (the 82 numbers, fp32), ``config.json``
(:class:`~metaperturb.phi.PerturbationConfig` plus a format version) and a ``README.md`` model
card, the layout of ``PyTorchModelHubMixin``. Loading is strict, since a regularizer that silently
loads half its weights still trains, just badly: every tensor must be present with its exact shape,
finite and floating point, and nothing else may be in the file. Files are never unpickled.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import struct
import tempfile
import uuid
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache
from huggingface_hub.utils import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor

from ._version import __version__
from .errors import DefaultPhiUnavailableError, PhiFormatError, PhiNotFoundError
from .phi import Perturbation, PerturbationConfig

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "MODEL_CARD_NAME",
    "WEIGHTS_NAME",
    "default_phi_path",
    "load_default_phi",
    "load_phi",
    "push_to_hub",
    "save_pretrained",
]

#: Version of the on-disk layout this library writes and the newest one it reads.
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MODEL_CARD_NAME = "README.md"

# safetensors header keys written by metaperturb itself (the rest of the header metadata is the
# user's ``config.metadata``).
_FORMAT_KEY = "metaperturb_format_version"
_CONFIG_KEY = "metaperturb_config"
_RESERVED_HEADER_KEYS = frozenset({"format", _FORMAT_KEY, _CONFIG_KEY})
_PROVENANCE_KEYS = ("source_dataset", "source_architecture")
_UNKNOWN = "unknown"
# phi holds 82 numbers (about 1 KB as safetensors); anything far larger is not a phi and is not
# read into memory.
_MAX_FILE_BYTES = 16 * 1024 * 1024
# Plain YAML scalars that would not read back as strings.
_YAML_WORDS = frozenset({"null", "true", "false", "yes", "no", "on", "off", "y", "n"})
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows only
_HUB_TAGS = ("metaperturb", "regularization", "pytorch", "image-classification")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_UPGRADE_HINT = "upgrade metaperturb (`pip install -U metaperturb`)"
_CONVERT_HINT = (
    "metaperturb never unpickles files (unpickling can run arbitrary code). If this is the "
    "authors' MetaPerturb checkpoint (perturb_750.pth), convert it once with "
    "`python -m metaperturb.convert IN.pth OUT_DIR` (see metaperturb.convert) and load OUT_DIR."
)
_NO_DEFAULT_MESSAGE = (
    "metaperturb does not ship a meta-trained phi* yet (it is being meta-trained; see the "
    "README). Pass phi= explicitly: a Hub repo id, a local folder or .safetensors file saved "
    "with save_pretrained, or metaperturb.Perturbation() for an untrained phi (for experiments "
    "only)."
)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def save_pretrained(
    phi: Perturbation,
    save_directory: str | os.PathLike[str],
    *,
    repo_id: str | None = None,
    provenance: str | None = None,
    license: str = "mit",
) -> Path:
    """Write ``phi`` as a folder that :func:`load_phi` and the Hub understand.

    Every file is written to a temporary file in the same folder and moved into place with
    ``os.replace`` only once all of them were written, so an error (disk full, interrupt) leaves
    the previous files intact and no partial file behind.

    Args:
        phi: The perturbation function to save.
        save_directory: Target folder, created if needed; existing files are replaced.
        repo_id: The Hub repository the folder is meant for, used in the model card's example.
        provenance: Free text for the model card's provenance section (how phi was trained).
        license: The licence in the model card's metadata.

    Returns:
        The folder written.

    Example:
        >>> import tempfile
        >>> from metaperturb.phi import Perturbation
        >>> folder = save_pretrained(Perturbation(), tempfile.mkdtemp())
        >>> sorted(p.name for p in folder.iterdir())
        ['README.md', 'config.json', 'model.safetensors']
    """
    metadata = _checked_metadata(phi.config.metadata)
    config = phi.config.to_dict()
    files = {
        WEIGHTS_NAME: _weights_bytes(phi, metadata, config),
        CONFIG_NAME: _config_bytes(config),
        MODEL_CARD_NAME: _model_card(phi, repo_id, provenance, license).encode("utf-8"),
    }
    directory = Path(save_directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        _write_files_atomically(directory, files)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only succeeds if nothing of ours is left in it
        raise
    return directory


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


def _weights_bytes(phi: Perturbation, metadata: dict[str, str], config: dict[str, Any]) -> bytes:
    tensors = {
        name: tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
        for name, tensor in phi.state_dict().items()
    }
    header = dict(metadata)
    for key in _PROVENANCE_KEYS:
        header.setdefault(key, _UNKNOWN)
    # The config travels in the header too, so a lone model.safetensors keeps it.
    header.update(
        {
            "format": "pt",
            _FORMAT_KEY: str(FORMAT_VERSION),
            _CONFIG_KEY: json.dumps(config, sort_keys=True),
        }
    )
    return safetensors_save(tensors, metadata=header)


def _config_bytes(config: dict[str, Any]) -> bytes:
    payload = {**config, "format_version": FORMAT_VERSION, "library_name": "metaperturb"}
    return (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _yaml_str(value: str) -> str:
    if re.fullmatch(r"[a-z][a-z0-9.-]*", value) and value not in _YAML_WORDS:
        return value
    # A JSON string literal is a valid YAML double-quoted scalar, whatever it contains.
    return json.dumps(value, ensure_ascii=False)


def _model_card(
    phi: Perturbation, repo_id: str | None, provenance: str | None, license: str
) -> str:
    metadata = phi.config.metadata
    dataset = metadata.get("source_dataset", _UNKNOWN)
    architecture = metadata.get("source_architecture", _UNKNOWN)
    front = ["---", "library_name: metaperturb", f"license: {_yaml_str(license)}", "tags:"]
    front += [f"- {tag}" for tag in _HUB_TAGS]
    if dataset != _UNKNOWN:
        front += ["datasets:", f"- {_yaml_str(dataset)}"]
    front.append("---")

    target = repo_id if repo_id is not None else "<org>/<name>"
    config = {k: v for k, v in phi.config.to_dict().items() if k != "metadata"}
    rows = [("Source dataset", dataset), ("Source architecture", architecture)]
    rows += [(key, value) for key, value in sorted(metadata.items()) if key not in _PROVENANCE_KEYS]
    rows += [(f"config.{key}", repr(value)) for key, value in config.items()]
    table = ["| | |", "| --- | --- |"] + [f"| {k} | {_cell(str(v))} |" for k, v in rows]
    body = [
        f"# MetaPerturb phi{f': {repo_id}' if repo_id else ''}",
        "",
        (
            "A meta-learned feature-perturbation function (phi) for "
            "[metaperturb](https://github.com/metaperturb/metaperturb), after MetaPerturb "
            "(Ryu, Shin, Lee and Hwang, NeurIPS 2020). phi has 82 parameters shared by every layer "
            "of every network: it multiplies each feature map by input-dependent noise scaled per "
            "channel, and regularizes a network trained from scratch on a new task. phi itself is "
            "frozen on the target task."
        ),
        "",
        "## Usage",
        "",
        "```python",
        "import metaperturb",
        "",
        f'model = metaperturb.wrap(model, phi="{target}")',
        "```",
        "",
        'A local copy of this folder works too: `metaperturb.wrap(model, phi="path/to/folder")`.',
        "",
        "## Files",
        "",
        f"- `{WEIGHTS_NAME}`: the 82 parameters (fp32); loaded strictly, never unpickled.",
        f"- `{CONFIG_NAME}`: the phi configuration (format version {FORMAT_VERSION}).",
        "",
        "## Provenance",
        "",
        *table,
        "",
    ]
    if provenance:
        body += [provenance.strip(), ""]
    body += [
        "## Citation",
        "",
        "```bibtex",
        "@inproceedings{ryu2020metaperturb,",
        "  title={MetaPerturb: Transferable Regularizer for Heterogeneous Tasks and Architectures},",
        "  author={Ryu, Jeongun and Shin, Jaewoong and Lee, Hae Beom and Hwang, Sung Ju},",
        "  booktitle={Advances in Neural Information Processing Systems},",
        "  year={2020}",
        "}",
        "```",
        "",
    ]
    return "\n".join(front + [""] + body)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _write_files_atomically(directory: Path, files: Mapping[str, bytes]) -> None:
    """Write every file to a temporary sibling first; move them into place only if all succeed."""
    temporaries: dict[str, Path] = {}
    try:
        for name, data in files.items():
            temporaries[name] = _write_temporary(directory, name, data)
        for name, temporary in temporaries.items():
            os.replace(temporary, directory / name)
    finally:
        for temporary in temporaries.values():
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
    _fsync_directory(directory)


def _write_temporary(directory: Path, name: str, data: bytes) -> Path:
    # os.open with mode 0o666 lets the umask decide the permissions, as for any new file.
    temporary = directory / f".{name}.{uuid.uuid4().hex}.tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def _fsync_directory(directory: Path) -> None:
    # Makes the renames durable on POSIX; directories cannot be opened this way on Windows.
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_phi(
    path_or_repo: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> Perturbation:
    """Load a phi from a folder, a ``.safetensors`` file or a Hub repository, strictly.

    A string that is not an existing path and has the form ``org/name`` is a Hub repository:
    ``model.safetensors`` and ``config.json`` are fetched with ``hf_hub_download`` (cached; the
    Hub's usual offline rules apply). The file must hold exactly phi's six tensors with their
    shapes, floating point and finite; any problem is a :class:`~metaperturb.errors.PhiFormatError`
    that says what to fix.

    Args:
        path_or_repo: A folder saved by :func:`save_pretrained`, a ``.safetensors`` file, or a Hub
            repo id.
        revision: Hub branch, tag or commit (Hub only).
        cache_dir: Hub cache folder (Hub only); defaults to the Hub's own.
        local_files_only: Use the Hub cache only, never the network.
        token: Hub token for private repositories (``False``: send none).
        endpoint: Hub endpoint, e.g. a mirror; defaults to ``HF_ENDPOINT``.

    Returns:
        The loaded phi, its ``config.metadata`` filled from the file.

    Raises:
        PhiNotFoundError: Nothing found at the path, repository, revision or in the cache.
        PhiFormatError: The file is not a valid metaperturb phi.

    Example:
        >>> import tempfile
        >>> from metaperturb.phi import Perturbation
        >>> folder = save_pretrained(Perturbation(), tempfile.mkdtemp())
        >>> sum(p.numel() for p in load_phi(folder).parameters())
        82
    """
    path = Path(path_or_repo)
    if path.exists() or isinstance(path_or_repo, os.PathLike):
        hub_only = {"revision": revision, "cache_dir": cache_dir, "endpoint": endpoint}
        ignored = [name for name, value in hub_only.items() if value is not None]
        if ignored:
            warnings.warn(
                f"{', '.join(ignored)} only apply to Hub repositories and are ignored for the "
                f"local path {str(path)!r}.",
                stacklevel=2,
            )
        return _load_local(path)
    text = str(path_or_repo)
    if not _REPO_ID.fullmatch(text) or text.endswith(".safetensors"):
        raise PhiNotFoundError(
            f"No phi at {text!r}: no such file or folder. Pass a folder saved with "
            "save_pretrained, a .safetensors file, or a Hub repo id of the form 'org/name'."
        )
    weights, config = _download(
        text,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=token,
        endpoint=endpoint,
    )
    return _load_file(weights, config, source=f"Hub repository {text!r}")


def _load_local(path: Path) -> Perturbation:
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            found = sorted(p.name for p in path.iterdir())
            hint = ""
            if any(name.endswith((".pth", ".pt", ".bin", ".ckpt")) for name in found):
                hint = f" It holds a PyTorch pickle checkpoint: {_CONVERT_HINT}"
            raise PhiNotFoundError(
                f"The folder {str(path)!r} has no {WEIGHTS_NAME} (it holds {found or 'nothing'}); "
                f"a phi folder is written by metaperturb.hub.save_pretrained.{hint}"
            )
        config = path / CONFIG_NAME
        return _load_file(weights, config if config.is_file() else None, source=str(path))
    if path.is_file():
        # A lone file named model.safetensors still picks up the config.json beside it.
        config = path.with_name(CONFIG_NAME)
        use_config = path.name == WEIGHTS_NAME and config.is_file()
        return _load_file(path, config if use_config else None, source=str(path))
    raise PhiNotFoundError(
        f"No phi at {str(path)!r}: no such file or folder. Pass a folder saved with "
        "save_pretrained, a .safetensors file, or a Hub repo id of the form 'org/name'."
    )


def _load_file(weights: Path, config_path: Path | None, *, source: str) -> Perturbation:
    tensors, header = _read_safetensors(weights)
    _check_format_version(header.get(_FORMAT_KEY), f"{weights} (header {_FORMAT_KEY!r})")
    config = _config_from(config_path, header, weights)
    with torch.random.fork_rng(devices=[]):  # building phi must not move the caller's RNG
        phi = Perturbation(config)
    expected = {name: tuple(t.shape) for name, t in phi.state_dict().items()}
    state = _validate_tensors(tensors, expected, source=f"{weights}")
    phi.load_state_dict(state, strict=True)
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
            hint = _CONVERT_HINT
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
            f"{__version__} reads up to {FORMAT_VERSION}). To load it, {_UPGRADE_HINT}."
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
        if key not in _RESERVED_HEADER_KEYS and not (key in _PROVENANCE_KEYS and value == _UNKNOWN)
    }
    if config_path is not None:
        where = str(config_path)
        try:
            data = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
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
        except json.JSONDecodeError:
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


def _validate_tensors(
    tensors: Mapping[str, Tensor],
    expected: Mapping[str, tuple[int, ...]],
    *,
    source: str,
) -> dict[str, Tensor]:
    """Check a state dict against the expected names and shapes; return it as fp32.

    Every problem is collected and reported at once, each naming the tensor and the fix.
    """
    problems: list[str] = []
    for name in expected:
        if name not in tensors:
            problems.append(f"missing tensor {name!r} (shape {_shape(expected[name])})")
    for name in tensors:
        if name not in expected:
            problems.append(f"unexpected tensor {name!r}: a phi holds only {sorted(expected)}")
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


# --------------------------------------------------------------------------------------------
# The Hub
# --------------------------------------------------------------------------------------------


def _network_errors() -> tuple[type[BaseException], ...]:
    """Transport errors of whichever HTTP client this huggingface_hub uses (they are no OSError)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name, attribute in (
        ("httpx2", "TransportError"),
        ("httpx", "TransportError"),
        ("requests", "RequestException"),
    ):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        error = getattr(module, attribute, None)
        if isinstance(error, type) and issubclass(error, BaseException):
            found.append(error)
    return tuple(found)


# Errors meaning "the Hub could not be reached".
_UNREACHABLE: tuple[type[BaseException], ...] = (OfflineModeIsEnabled, *_network_errors())


def _offline_mode() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if callable(check) else getattr(constants, "HF_HUB_OFFLINE", False))


def _download(
    repo_id: str,
    *,
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
    local_files_only: bool,
    token: str | bool | None,
    endpoint: str | None,
) -> tuple[Path, Path | None]:
    """Fetch model.safetensors (required) and config.json (optional) from the Hub or its cache."""
    options: dict[str, Any] = {
        "revision": revision,
        "cache_dir": cache_dir,
        "local_files_only": local_files_only,
        "token": token,
        "endpoint": endpoint,
        "library_name": "metaperturb",
        "library_version": __version__,
    }
    with _hub_errors(repo_id, revision, cache_dir, local_files_only, endpoint):
        weights = Path(hf_hub_download(repo_id, WEIGHTS_NAME, **options))
        config = _download_config(repo_id, options)
    return weights, config


def _download_config(repo_id: str, options: dict[str, Any]) -> Path | None:
    """config.json, or None where the repository has none (then the default config applies)."""
    try:
        return Path(hf_hub_download(repo_id, CONFIG_NAME, **options))
    except LocalEntryNotFoundError:
        # Offline: the cache remembers a config.json the Hub said does not exist.
        cached = try_to_load_from_cache(
            repo_id, CONFIG_NAME, cache_dir=options["cache_dir"], revision=options["revision"]
        )
        if isinstance(cached, str):
            return Path(cached)
        if cached is not None:  # the cache's "does not exist on the Hub" marker
            return None
        raise
    except EntryNotFoundError:
        return None


@contextlib.contextmanager
def _hub_errors(
    repo_id: str,
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
    local_files_only: bool,
    endpoint: str | None,
) -> Iterator[None]:
    """Turn huggingface_hub's errors into PhiNotFoundError messages that say what to do."""
    from huggingface_hub import constants

    at = f" at revision {revision!r}" if revision else ""
    host = endpoint or constants.ENDPOINT
    cache = str(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
    try:
        yield
    except RevisionNotFoundError as error:
        raise PhiNotFoundError(
            f"Hub repository {repo_id!r} has no revision {revision!r}. Pass an existing branch, "
            "tag or commit as revision=, or leave it out for 'main'."
        ) from error
    except RepositoryNotFoundError as error:
        raise PhiNotFoundError(
            f"Hub repository {repo_id!r} not found at {host}. Check the repo id (org/name); if "
            "the repository is private or gated, pass token= or log in with `hf auth login`. "
            "For a local folder, pass a path that exists."
        ) from error
    except LocalEntryNotFoundError as error:
        if local_files_only:
            reason = "local_files_only=True and it is not in the Hub cache"
        elif _offline_mode():
            reason = "offline mode is on (HF_HUB_OFFLINE) and it is not in the Hub cache"
        else:
            reason = f"the Hub at {host} could not be reached and it is not in the Hub cache"
        raise PhiNotFoundError(
            f"Could not load phi from Hub repository {repo_id!r}{at}: {reason} ({cache}). "
            + _offline_hint()
        ) from error
    except EntryNotFoundError as error:
        raise PhiNotFoundError(
            f"Hub repository {repo_id!r}{at} has no {WEIGHTS_NAME}, so it is not a metaperturb "
            f"phi repository (those are written by push_to_hub / save_pretrained). If it holds "
            f"the authors' .pth checkpoint: {_CONVERT_HINT}"
        ) from error
    except _UNREACHABLE as error:
        raise PhiNotFoundError(
            f"Could not load phi from Hub repository {repo_id!r}{at}: the Hub at {host} could "
            f"not be reached ({type(error).__name__}: {error}). " + _offline_hint()
        ) from error
    except HfHubHTTPError as error:
        raise PhiNotFoundError(
            f"Could not load phi from Hub repository {repo_id!r}{at} ({error}). "
            "Retry later; " + _offline_hint()
        ) from error


def push_to_hub(
    phi: Perturbation,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload metaperturb phi",
    endpoint: str | None = None,
    provenance: str | None = None,
) -> str:
    """Save ``phi`` with :func:`save_pretrained` and upload it to a Hub repository.

    The repository is created if needed (and the branch, if ``revision`` names a new one).

    Args:
        phi: The perturbation function to upload.
        repo_id: Target repository, ``org/name``.
        revision: Branch to commit to; defaults to ``main``.
        private: Visibility of a newly created repository.
        token: Hub token with write access; defaults to the logged-in one.
        commit_message: Message of the commit.
        endpoint: Hub endpoint; defaults to ``HF_ENDPOINT``.
        provenance: Text for the model card's provenance section.

    Returns:
        The URL of the commit.

    Example:
        >>> push_to_hub(phi, "my-org/metaperturb-phi")  # doctest: +SKIP
        'https://huggingface.co/my-org/metaperturb-phi/commit/...'
    """
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="metaperturb-push-") as folder:
        save_pretrained(phi, folder, repo_id=repo_id, provenance=provenance)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            revision=revision,
        )
    return str(info.commit_url)


# --------------------------------------------------------------------------------------------
# The bundled phi*
# --------------------------------------------------------------------------------------------


def default_phi_path() -> Path:
    """The folder of the bundled phi*: inside the installed package, or the source checkout's.

    The wheel maps the repository's top-level ``weights/`` folder to ``metaperturb/weights``; an
    editable install or a source checkout reads ``<repo>/weights`` instead.
    """
    package = Path(__file__).resolve().parent
    installed = package / "weights"
    if installed.is_dir():
        return installed / "phi-star"
    checkout = package.parents[1]  # src/metaperturb -> repository root
    if (checkout / "weights").is_dir() and (checkout / "pyproject.toml").is_file():
        return checkout / "weights" / "phi-star"
    return installed / "phi-star"


def _offline_hint() -> str:
    if (default_phi_path() / WEIGHTS_NAME).is_file():
        default = "`metaperturb.wrap(model)` with no phi uses the bundled default phi*"
    else:
        default = (
            "`metaperturb.wrap(model)` with no phi will use the bundled default phi* "
            "(not shipped in this version yet)"
        )
    return (
        f"Offline, {default}; a local folder or .safetensors file saved with save_pretrained "
        "loads without network; and HF_HUB_OFFLINE=1 loads a Hub repository already in the cache."
    )


def load_default_phi() -> Perturbation:
    """Load the bundled, meta-trained phi* that ``metaperturb.wrap(model)`` uses by default.

    Raises:
        DefaultPhiUnavailableError: This version ships no phi* yet.
    """
    folder = default_phi_path()
    if not (folder / WEIGHTS_NAME).is_file():
        raise DefaultPhiUnavailableError(_NO_DEFAULT_MESSAGE)
    return load_phi(folder)
