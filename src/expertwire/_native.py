"""Loads the compiled module. NVSHMEM's host library comes from the nvidia-nvshmem-cu13 wheel (or NVSHMEM_HOME);
it is loaded here by path, RTLD_GLOBAL, before the module, so libexpertwire finds it whatever the loader path,
and NVSHMEM's own plugins (bootstrap, transports) are found beside it."""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

# torch first: its import loads the CUDA runtime (libcudart.so.13) that libexpertwire links.
import torch

NVSHMEM_HOST_LIBRARY = "libnvshmem_host.so.3"
CUDA_MAJOR = 13


def require_cuda_torch(torch_version: str, torch_cuda: "str | None") -> None:
    """Raises ImportError, saying what to install, unless torch is a CUDA 13 build: the extension links the
    CUDA 13 runtime that such a torch loads, and a CPU-only or CUDA 12 torch would fail to load it."""
    if torch_cuda is not None and torch_cuda.split(".")[0] == str(CUDA_MAJOR):
        return
    built = "a CPU-only build" if torch_cuda is None else f"built for CUDA {torch_cuda}"
    raise ImportError(
        f"expertwire needs a CUDA {CUDA_MAJOR} build of torch (torch.version.cuda {CUDA_MAJOR}.x); this torch "
        f"{torch_version} is {built}: install one, e.g. pip install torch==2.11.0 (its PyPI wheels are CUDA "
        f"{CUDA_MAJOR} builds)"
    )


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


require_cuda_torch(torch.__version__, torch.version.cuda)
NVSHMEM_LIBRARY_DIR = _preload_nvshmem()

from . import _expertwire as ext  # noqa: E402

__all__ = ["ext", "NVSHMEM_LIBRARY_DIR"]
