#!/usr/bin/env bash
# Installs what expertwire builds against, skipping whatever is already there (the device machine has no
# network but ships all of it): OpenMPI, GoogleTest, CMake + Ninja, and NVSHMEM 3.4.5 from its pip wheel.
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
if ! python3 -c 'import nvidia.nvshmem' 2>/dev/null; then
  echo "install_deps: pip install nvidia-nvshmem-cu13==3.4.5"
  python3 -m pip install -q nvidia-nvshmem-cu13==3.4.5
fi
