#!/usr/bin/env bash
# Set up, build everything and run every test: the C++ suites under ctest (unit tests on the CPU, the installed
# package, multi-rank GPU tests with 2, 4 and 8 ranks) and the Python package's pytest suite (CPU tests;
# multi-rank GPU tests with 2 and 4 ranks). GPU tests are skipped, with the reason, where no GPU is visible. This is
# what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh build test
. scripts/env.sh
bash scripts/device/build.sh
bash scripts/install_python.sh
if ! (nvidia-smi -L 2>/dev/null | grep -q '^GPU '); then
  echo "NOTE: no GPU visible: the multi-rank GPU tests below are reported as skipped (scripts/device/run_ranks.sh exits 77,"
  echo "      ctest lists them as Skipped; pytest names the reason)"
fi
(cd build && ctest --output-on-failure)
scripts/device/with_mps.sh python3 -m pytest tests -rs
