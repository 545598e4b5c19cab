#!/usr/bin/env bash
# Set up, build everything and run the main job: the benchmark on NP ranks (default 8) sharing this
# machine's GPU (or one rank per GPU). Without a GPU it builds and says why it cannot run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh build
. scripts/env.sh
bash scripts/device/build.sh
status=0
scripts/device/run_ranks.sh "${NP:-8}" build/bench_all_to_all "$@" || status=$?
[ "$status" -eq 77 ] && exit 0
exit "$status"
