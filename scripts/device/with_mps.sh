#!/usr/bin/env bash
# Run a command that starts several rank processes itself (pytest, python3 -m tests.bench_all_to_all) with this
# machine's GPUs set up for it, as run_ranks.sh does for MPI programs:
#   with_mps.sh COMMAND [ARGS...]
# One GPU: a fresh CUDA MPS daemon runs for the command's lifetime, so ranks sharing the GPU run at once.
# Several GPUs or none: the command runs as is (each rank takes its own GPU; without a GPU the tests skip).
# The NVSHMEM environment matches run_ranks.sh (no NVLink multicast, no remote transport, a 2G heap).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: with_mps.sh COMMAND [ARGS...]" >&2; exit 2; }

. "$(dirname "$0")/rank_env.sh"
export_nvshmem_env
count_gpus
# Each rank sets its own CUDA_MPS_ACTIVE_THREAD_PERCENTAGE (100/ranks, or a smaller value already set: launches
# that share the GPU with others) before it touches CUDA.
if [ "$GPUS" -eq 1 ]; then start_fresh_mps; fi
"$@"
