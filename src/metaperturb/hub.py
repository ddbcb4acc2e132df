"""Saving and loading phi: a safetensors folder, a single file, the Hub, or the bundled phi*.

A saved phi is a folder with ``model.safetensors`` (the 82 numbers, fp32), ``config.json``
(:class:`~metaperturb.phi.PerturbationConfig` plus a format version) and a ``README.md`` model
card, the layout of ``PyTorchModelHubMixin``. Loading is strict (every tensor present with its
exact shape, finite, floating point, nothing else) and never unpickles; see
``metaperturb._serialization`` for the file format and ``metaperturb._model_card`` for the card.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.utils import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ._model_card import model_card
from ._serialization import (
    CONFIG_NAME,
    CONVERT_HINT,
    FORMAT_VERSION,
    MODEL_CARD_NAME,
    WEIGHTS_NAME,
    config_bytes,
    load_file,
    weights_bytes,
    write_folder,
)
from ._version import __version__
from .errors import DefaultPhiUnavailableError, HubCacheError, PhiNotFoundError
from .phi import Perturbation

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

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NO_DEFAULT_MESSAGE = (
    "metaperturb does not ship a meta-trained phi* yet (it is being meta-trained; see the "
    "README). Pass phi= explicitly: a Hub repo id, a local folder or .safetensors file saved "
    "with save_pretrained, or metaperturb.Perturbation() for an untrained phi (for experiments "
    "only)."
)


# --------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------


def save_pretrained(
    phi: Perturbation,
    save_directory: str | os.PathLike[str],
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    provenance: str | None = None,
    license: str = "mit",
) -> Path:
    """Write ``phi`` as a folder that :func:`load_phi` and the Hub understand.

    The files are written atomically: an error (disk full, interrupt) leaves the previous files
    intact and no partial file behind.

    Args:
        phi: The perturbation function to save.
        save_directory: Target folder, created if needed; existing files are replaced.
        repo_id: The Hub repository the folder is meant for, used in the model card's example.
        revision: The branch of ``repo_id`` it is meant for, in the example too (``main``: none).
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
    files = {
        WEIGHTS_NAME: weights_bytes(phi),  # first: it checks config.metadata
        CONFIG_NAME: config_bytes(phi.config),
        MODEL_CARD_NAME: model_card(phi, repo_id, provenance, license, revision).encode("utf-8"),
    }
    return write_folder(Path(save_directory), files)


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
        raise _no_phi_at(text)
    options: dict[str, Any] = {
        "revision": revision,
        "cache_dir": cache_dir,
        "local_files_only": local_files_only,
        "token": token,
        "endpoint": endpoint,
        "library_name": "metaperturb",
        "library_version": __version__,
    }
    with _hub_errors(text, options):
        weights = Path(hf_hub_download(text, WEIGHTS_NAME, **options))
        # config.json of the same commit: a push between the two downloads must not pair the
        # new config with the old weights (or the reverse); the config wins over the header.
        commit = _snapshot_commit(weights)
        config = _download_config(text, {**options, "revision": commit or revision})
    return load_file(weights, config)


def _snapshot_commit(path: Path) -> str | None:
    """The commit a file downloaded into the Hub cache belongs to (its snapshot folder's
    name, ``snapshots/<commit>/<file>``), or ``None`` outside that layout."""
    folder = path.parent
    if folder.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", folder.name):
        return folder.name
    return None


def _load_local(path: Path) -> Perturbation:
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            found = sorted(p.name for p in path.iterdir())
            hint = ""
            if any(name.endswith((".pth", ".pt", ".bin", ".ckpt")) for name in found):
                hint = f" It holds a PyTorch pickle checkpoint: {CONVERT_HINT}"
            raise PhiNotFoundError(
                f"The folder {str(path)!r} has no {WEIGHTS_NAME} (it holds {found or 'nothing'}); "
                f"a phi folder is written by metaperturb.hub.save_pretrained.{hint}"
            )
        config = path / CONFIG_NAME
        return load_file(weights, config if config.is_file() else None)
    if path.is_file():
        # A lone file named model.safetensors still picks up the config.json beside it.
        config = path.with_name(CONFIG_NAME)
        use_config = path.name == WEIGHTS_NAME and config.is_file()
        return load_file(path, config if use_config else None)
    raise _no_phi_at(str(path))


def _no_phi_at(text: str) -> PhiNotFoundError:
    return PhiNotFoundError(
        f"No phi at {text!r}: no such file or folder. Pass a folder saved with "
        "save_pretrained, a .safetensors file, or a Hub repo id of the form 'org/name'."
    )


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
    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if callable(check) else getattr(constants, "HF_HUB_OFFLINE", False))


def _download_config(repo_id: str, options: Mapping[str, Any]) -> Path | None:
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
def _hub_errors(repo_id: str, options: Mapping[str, Any]) -> Iterator[None]:
    """Turn huggingface_hub's errors into PhiNotFoundError messages that say what to do."""
    revision = options["revision"]
    at = f" at revision {revision!r}" if revision else ""
    host = options["endpoint"] or constants.ENDPOINT
    cache_dir = options["cache_dir"]
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
        if options["local_files_only"]:
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
            f"the authors' .pth checkpoint: {CONVERT_HINT}"
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
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise HubCacheError(
            f"Could not download phi from Hub repository {repo_id!r}{at}: the Hub cache {cache} "
            f"is not writable ({error}). Pass cache_dir= a writable folder or set HF_HUB_CACHE; "
            "a phi already in the cache loads from a read-only cache without writing."
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
        save_pretrained(phi, folder, repo_id=repo_id, revision=revision, provenance=provenance)
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
