"""Loads the compiled module. NVSHMEM's host library comes from the nvidia-nvshmem-cu13 wheel (or NVSHMEM_HOME);
it is loaded here by path, RTLD_GLOBAL, before the module, so libexpertwire finds it whatever the loader path,
and NVSHMEM's own plugins (bootstrap, transports) are found beside it."""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

# torch first: its import loads the CUDA runtime (libcudart.so.13) that libexpertwire links.
import torch  # noqa: F401

NVSHMEM_HOST_LIBRARY = "libnvshmem_host.so.3"


def _nvshmem_library_dirs() -> list[Path]:
    dirs: list[Path] = []
    if os.environ.get("NVSHMEM_HOME"):
        home = Path(os.environ["NVSHMEM_HOME"])
        dirs += [home / "lib", home / "lib64"]
    spec = importlib.util.find_spec("nvidia.nvshmem")
    if spec is not None and spec.submodule_search_locations:
        dirs += [Path(location) / "lib" for location in spec.submodule_search_locations]
    return dirs


def _preload_nvshmem() -> Path:
    searched = _nvshmem_library_dirs()
    for directory in searched:
        library = directory / NVSHMEM_HOST_LIBRARY
        if library.is_file():
            ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
            return directory
    where = ", ".join(str(d) for d in searched) or "no nvidia.nvshmem package, no NVSHMEM_HOME"
    raise ImportError(
        f"expertwire needs NVSHMEM's {NVSHMEM_HOST_LIBRARY} and found none (searched: {where}); "
        "install it with: pip install nvidia-nvshmem-cu13, or set NVSHMEM_HOME"
    )


NVSHMEM_LIBRARY_DIR = _preload_nvshmem()

from . import _expertwire as ext  # noqa: E402

__all__ = ["ext", "NVSHMEM_LIBRARY_DIR"]
