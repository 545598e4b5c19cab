"""Builds the expertwire wheel: CMake builds libexpertwire.so and the nanobind module _expertwire from csrc/
(-DWITH_PYTHON=ON) and installs both into the package folder.

`pip install .` and `TORCH_CUDA_ARCH_LIST=9.0a+PTX python3 setup.py bdist_wheel` both come through here.
Environment: TORCH_CUDA_ARCH_LIST or CMAKE_CUDA_ARCHITECTURES picks the GPU targets (default 90a), NVSHMEM_HOME an
NVSHMEM install other than the nvidia-nvshmem-cu13 wheel, CMAKE_ARGS extra CMake arguments, MAX_JOBS the build
parallelism.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
NVSHMEM_DIST = "nvidia-nvshmem-cu13"
# Oldest NVSHMEM whose host library runs the device library we link (3.x host libraries accept older 3.x device
# libraries); raised to the version found at build time.
NVSHMEM_FLOOR = "3.4.5"


def nvshmem_wheel_dir() -> str | None:
    """The nvidia/nvshmem folder of the wheel visible to this interpreter, if any."""
    spec = importlib.util.find_spec("nvidia.nvshmem")
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def nvshmem_requirement() -> str:
    try:
        built = importlib.metadata.version(NVSHMEM_DIST)
    except importlib.metadata.PackageNotFoundError:
        built = NVSHMEM_FLOOR
    return f"{NVSHMEM_DIST}>={built},<4"


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        package_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)

        configure = [
            "cmake",
            "-S",
            str(ROOT / "csrc"),
            "-B",
            str(build_dir),
            "-DWITH_PYTHON=ON",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPython3_EXECUTABLE={sys.executable}",
        ]
        if shutil.which("ninja"):
            configure += ["-GNinja"]
        nvshmem_home = os.environ.get("NVSHMEM_HOME") or nvshmem_wheel_dir()
        if nvshmem_home:
            configure += [f"-DNVSHMEM_HOME={nvshmem_home}"]
        if os.environ.get("CMAKE_CUDA_ARCHITECTURES"):
            configure += [f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['CMAKE_CUDA_ARCHITECTURES']}"]
        configure += shlex.split(os.environ.get("CMAKE_ARGS", ""))

        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "_expertwire", "-j", jobs], check=True)
        subprocess.run(
            ["cmake", "--install", str(build_dir), "--component", "python", "--prefix", str(package_dir)],
            check=True,
        )


setup(
    package_dir={"": "src"},
    packages=["expertwire"],
    package_data={"expertwire": ["py.typed"]},
    ext_modules=[CMakeExtension("expertwire._expertwire")],
    cmdclass={"build_ext": CMakeBuild},
    # numpy: torch warns on every import without it ("Failed to initialize NumPy").
    install_requires=["torch>=2.4", nvshmem_requirement(), "numpy"],
    # Keep setuptools' folders apart from build/, where scripts/device/build.sh keeps the C++ build.
    options={"build": {"build_base": "build-python"}},
    zip_safe=False,
)
