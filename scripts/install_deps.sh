#!/usr/bin/env bash
# Installs what expertwire builds and tests against, keeping whatever is already there and fits, and stops with
# a message naming what is missing and how to get it.
#   bash scripts/install_deps.sh [GROUP...]      groups of scripts/python-deps.txt (default: build test)
# System (Debian/Ubuntu apt, as root or through sudo): OpenMPI, GoogleTest/GoogleMock, CMake, Ninja.
# CUDA: the CUDA 13 toolkit (nvcc) must be installed already; this script checks it, it does not install it.
# Python: the packages of scripts/python-deps.txt, into the interpreter scripts/env.sh picks (an active
# virtual environment, or the project's .venv, created here).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
groups=("$@")
[ ${#groups[@]} -gt 0 ] || groups=(build test)

fail() {
  echo "install_deps: $*" >&2
  exit 1
}

[ "$(uname -s)" = Linux ] || fail "expertwire builds on Linux only (this is $(uname -s))"
[ "$(uname -m)" = x86_64 ] || fail "expertwire's dependencies (NVSHMEM's wheel, torch's CUDA build) are installed for x86_64 here; this machine is $(uname -m)"

# --- CUDA toolkit -------------------------------------------------------------------------------------
command -v nvcc >/dev/null ||
  fail "no CUDA compiler: nvcc is neither on PATH nor in ${CUDA_HOME:-/usr/local/cuda}/bin. expertwire needs the CUDA 13 toolkit" \
       "(13.0 or newer): install it from https://developer.nvidia.com/cuda-downloads (Debian/Ubuntu: the" \
       "cuda-toolkit-13-0 package of NVIDIA's apt repository), or put its bin/ on PATH"
cuda_version=$(nvcc --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p')
[ "${cuda_version%%.*}" -ge 13 ] 2>/dev/null ||
  fail "nvcc at $(command -v nvcc) is CUDA ${cuda_version:-of unknown version}; expertwire needs the CUDA 13 toolkit" \
       "(its NVSHMEM and torch builds use the CUDA 13 runtime): install cuda-toolkit-13-0, or put a CUDA 13 nvcc first on PATH"
echo "install_deps: CUDA toolkit $cuda_version ($(command -v nvcc))"

# --- system packages ----------------------------------------------------------------------------------
need_apt=()
[ -f /usr/include/x86_64-linux-gnu/openmpi/mpi.h ] || [ -f /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h ] ||
  need_apt+=(libopenmpi-dev)
command -v mpirun >/dev/null || need_apt+=(openmpi-bin)
[ -f /usr/include/gtest/gtest.h ] && [ -f /usr/include/gmock/gmock.h ] || need_apt+=(libgtest-dev libgmock-dev)
command -v cmake >/dev/null || need_apt+=(cmake)
command -v ninja >/dev/null || need_apt+=(ninja-build)
if [ "$EW_PYTHON" = "$EW_ROOT/.venv/bin/python3" ] && [ ! -x "$EW_PYTHON" ]; then
  command -v python3 >/dev/null || need_apt+=(python3)
  command -v python3 >/dev/null && python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  as_root=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || fail "missing system packages: ${need_apt[*]}; install them as root (apt-get install ${need_apt[*]})"
    as_root=(sudo)
  fi
  command -v apt-get >/dev/null ||
    fail "missing system packages: ${need_apt[*]} (Debian names); this machine has no apt-get: install the same with its package manager"
  echo "install_deps: apt-get update, then apt-get install ${need_apt[*]}"
  "${as_root[@]}" apt-get update
  DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y "${need_apt[@]}"
fi

# --- Python ---------------------------------------------------------------------------------------------
if [ ! -x "$EW_PYTHON" ]; then
  [ "$EW_PYTHON" = "$EW_ROOT/.venv/bin/python3" ] || fail "EXPERTWIRE_PYTHON=$EW_PYTHON is not an executable"
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    fail "python3 is $(python3 --version 2>&1); expertwire needs Python 3.10 or newer (the pinned torch, numpy and matplotlib do)"
  echo "install_deps: creating the virtual environment .venv ($(python3 --version))"
  python3 -m venv "$EW_ROOT/.venv"
fi
echo "install_deps: Python packages go to $("$EW_PYTHON" -c 'import sys; print(sys.prefix)') ($("$EW_PYTHON" --version))"
mapfile -t wanted < <("$EW_PYTHON" scripts/check_python_deps.py "${groups[@]}")
if [ ${#wanted[@]} -gt 0 ] && [ -n "${wanted[0]}" ]; then
  # pip refuses to install into a Python the system manages (PEP 668) outside a virtual environment.
  if "$EW_PYTHON" -c 'import os, sys, sysconfig
sys.exit(not (sys.prefix == sys.base_prefix and os.path.isfile(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))'; then
    fail "$EW_PYTHON is a Python the system manages (EXTERNALLY-MANAGED): pip may not install ${wanted[*]} into it;" \
         "unset EXPERTWIRE_PYTHON to use the project's .venv, or activate a virtual environment first"
  fi
  note=""
  case " ${wanted[*]}" in *" torch=="*) note=" (torch is about 3 GB with its CUDA libraries)" ;; esac
  echo "install_deps: pip install ${wanted[*]}$note"
  "$EW_PYTHON" -m pip install --disable-pip-version-check --root-user-action=ignore --progress-bar on "${wanted[@]}" ||
    fail "pip could not install ${wanted[*]} into $("$EW_PYTHON" -c 'import sys; print(sys.prefix)') (no network," \
         "or no wheel for this Python?); install those versions (or versions scripts/python-deps.txt accepts) and run again"
  mapfile -t still < <("$EW_PYTHON" scripts/check_python_deps.py "${groups[@]}" 2>/dev/null)
  [ -z "${still[*]}" ] || fail "still not acceptable after pip install: ${still[*]}"
fi
