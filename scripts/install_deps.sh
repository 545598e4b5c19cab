#!/usr/bin/env bash
# Installs what expertwire builds against, skipping whatever is already there (the device machine has no
# network but ships all of it): OpenMPI, GoogleTest, CMake + Ninja, NVSHMEM 3.4.5 from its pip wheel, and for the
# Python package torch 2.11 (its cu130 build pins the same NVSHMEM), nanobind, wheel and pytest.
set -euo pipefail
need_apt=()
[ -f /usr/include/x86_64-linux-gnu/openmpi/mpi.h ] || [ -f /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h ] ||
  need_apt+=(libopenmpi-dev openmpi-bin)
command -v mpirun >/dev/null || need_apt+=(openmpi-bin)
[ -f /usr/include/gtest/gtest.h ] && [ -f /usr/include/gmock/gmock.h ] || need_apt+=(libgtest-dev libgmock-dev)
command -v cmake >/dev/null || need_apt+=(cmake)
command -v ninja >/dev/null || need_apt+=(ninja-build)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install_deps: apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
need_pip=()
python3 -c 'import nvidia.nvshmem' 2>/dev/null || need_pip+=(nvidia-nvshmem-cu13==3.4.5)
# torch from PyPI is large (about 3 GB with its CUDA wheels, 2-3 minutes here); 2.11 pins NVSHMEM 3.4.5 as we do.
python3 -c 'import torch' 2>/dev/null || need_pip+=(torch==2.11.0)
python3 -c 'import nanobind' 2>/dev/null || need_pip+=('nanobind>=2')
python3 -c 'import wheel' 2>/dev/null || need_pip+=(wheel)
python3 -c 'import pytest' 2>/dev/null || need_pip+=(pytest)
if [ ${#need_pip[@]} -gt 0 ]; then
  echo "install_deps: pip install ${need_pip[*]}"
  python3 -m pip install -q --root-user-action=ignore "${need_pip[@]}"
fi
