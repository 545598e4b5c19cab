#!/usr/bin/env bash
# Set up, build everything and run every test: the unit tests (CPU) and the multi-rank GPU tests with 2, 4
# and 8 ranks (skipped, with the reason, where no GPU is visible). This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
bash scripts/device/build.sh
cd build
if ! (nvidia-smi -L 2>/dev/null | grep -q '^GPU '); then
  echo "NOTE: no GPU visible: the multi-rank GPU tests below are reported as skipped (scripts/device/run_ranks.sh exits 77)"
fi
ctest --output-on-failure
