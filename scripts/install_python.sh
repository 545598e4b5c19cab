#!/usr/bin/env bash
# Build and install the expertwire Python package into python3's site-packages from this checkout, with the
# build tools already installed (scripts/install_deps.sh; the device machine ships them and has no network).
# CMake builds into build-python/ and reuses it on the next install.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
echo "install_python: building and installing expertwire into $(python3 -c 'import sys; print(sys.prefix)')"
python3 -m pip install --disable-pip-version-check --no-build-isolation --no-deps --force-reinstall \
  --root-user-action=ignore -q .
python3 -c 'import expertwire, expertwire._native as n; print("expertwire installed; NVSHMEM from", n.NVSHMEM_LIBRARY_DIR)'
