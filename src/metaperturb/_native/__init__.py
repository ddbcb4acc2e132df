"""Fused CPU kernels for the sites, compiled on first use.

On a CPU, phi's PyTorch form walks each feature map about twenty times per site (every
depthwise convolution and elementwise op is a pass over memory); ``site_kernels.cpp`` keeps one
image in cache through all of it. It is built with the machine's C++ compiler the first time a
site runs on a CPU in float32 (under a minute, once per machine and torch version; the build is
cached by :mod:`torch.utils.cpp_extension`). Without a compiler, or with
``METAPERTURB_NATIVE=0`` in the environment, the sites keep the PyTorch path: the same function
(``tests/test_native.py``), slower. ``METAPERTURB_NATIVE=1`` makes a failed build an error
instead of a warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

__all__ = [
    "available",
    "channels_last",
    "draw_key",
    "expectation",
    "kernel_layout",
    "kernels",
    "sampled",
    "scale_pool",
    "standard_normal",
    "usable",
]

_SOURCE = Path(__file__).with_name("site_kernels.cpp")
_lock = threading.Lock()
_module: ModuleType | None = None
_failed: str | None = None


def _setting() -> str:
    return os.environ.get("METAPERTURB_NATIVE", "auto").strip().lower()


def _cpu_signature() -> str:
    """What the build's ``-march=native`` depends on, so that a shared cache folder (an NFS home)
    never hands one machine another's instructions."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _flags() -> tuple[list[str], list[str]]:
    cflags = ["-O3", "-fopenmp", "-fno-math-errno"]
    ldflags = ["-fopenmp"]
    if sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64"):
        cflags += ["-march=native", "-DMETAPERTURB_VECTOR_MATH"]
        ldflags += ["-lmvec"]
    return cflags, ldflags


def _build() -> ModuleType:
    import torch

    # Importing cpp_extension logs a warning about CUDA on CPU-only builds: not ours to show.
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        quiet.setLevel(level)
    cflags, ldflags = _flags()
    key = hashlib.sha256(
        b"\0".join(
            part.encode()
            for part in (
                _SOURCE.read_text(),
                " ".join(cflags + ldflags),
                torch.__version__,
                sys.version,
                _cpu_signature(),
            )
        )
    ).hexdigest()[:16]
    name = f"metaperturb_site_kernels_{key}"
    # torch's own cache folder for extensions (TORCH_EXTENSIONS_DIR, as torch reads it).
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    if not any(folder.glob(f"{name}*.so")) and not any(folder.glob(f"{name}*.pyd")):
        logging.getLogger("metaperturb").warning(
            "compiling metaperturb's fused CPU site kernels (once per machine and torch "
            "version, under a minute; METAPERTURB_NATIVE=0 skips them)"
        )
    return cpp_extension.load(
        name=name,
        sources=[str(_SOURCE)],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        build_directory=str(folder),
        with_cuda=False,
        verbose=False,
    )


def kernels() -> ModuleType | None:
    """The compiled kernels, building them on the first call; ``None`` where they are turned
    off or cannot be built (a warning says why, once)."""
    global _module, _failed
    if _module is not None:
        return _module
    setting = _setting()
    if setting in ("0", "false", "off", "no") or _failed is not None:
        return None
    with _lock:
        if _module is None and _failed is None:
            try:
                _module = _build()
            except Exception as error:  # any build failure: keep the PyTorch path
                _failed = f"{type(error).__name__}: {error}"
                if setting in ("1", "true", "on", "yes"):
                    raise RuntimeError(
                        "metaperturb: METAPERTURB_NATIVE=1 but the fused CPU kernels did not "
                        f"build ({_failed}). Install a C++ compiler and ninja, or unset it."
                    ) from error
                warnings.warn(
                    "metaperturb: the fused CPU site kernels did not build, so the sites use "
                    f"the slower PyTorch path ({_failed.splitlines()[0]}). Install a C++ "
                    "compiler and ninja to get them, or set METAPERTURB_NATIVE=0 to silence "
                    "this.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _module


def available() -> bool:
    """Whether the fused kernels are (or can be) used in this process."""
    return kernels() is not None


from .autograd import (
    channels_last,
    draw_key,
    expectation,
    kernel_layout,
    sampled,
    scale_pool,
    standard_normal,
    usable,
)
