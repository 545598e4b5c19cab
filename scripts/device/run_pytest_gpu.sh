#!/usr/bin/env bash
# The multi-rank GPU tests of the Python package, under a fresh MPS daemon when the machine has one GPU.
#   run_pytest_gpu.sh [PYTEST ARGS...]          e.g. EXPERTWIRE_TEST_RANKS=2,4,8 run_pytest_gpu.sh -x
# Needs the package installed (bash scripts/install_python.sh). Ranks: EXPERTWIRE_TEST_RANKS (default 2,4).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/env.sh
exec scripts/device/with_mps.sh python3 -m pytest tests -m gpu -rs "$@"
