#!/usr/bin/env bash
# Run a command that starts several rank processes itself (pytest, python3 -m tests.bench_all_to_all) with this
# machine's GPUs set up for it, as run_ranks.sh does for MPI programs:
#   with_mps.sh COMMAND [ARGS...]
# One GPU: a fresh CUDA MPS daemon runs for the command's lifetime, so ranks sharing the GPU run at once.
# Several GPUs or none: the command runs as is (each rank takes its own GPU; without a GPU the tests skip).
# The NVSHMEM environment matches run_ranks.sh (no NVLink multicast, no remote transport, a 2G heap).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: with_mps.sh COMMAND [ARGS...]" >&2; exit 2; }

NV=$(python3 -c 'import nvidia.nvshmem as m;print(list(m.__path__)[0])' 2>/dev/null || true)
[ -n "$NV" ] && export LD_LIBRARY_PATH="$NV/lib:${LD_LIBRARY_PATH:-}"
# NVLink multicast stays off: it can take a shared host's GPUs out of service.
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export NVSHMEM_SYMMETRIC_SIZE=${NVSHMEM_SYMMETRIC_SIZE:-2G}
export NVSHMEM_REMOTE_TRANSPORT=${NVSHMEM_REMOTE_TRANSPORT:-none}

GPUS=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU ' || true)
if [ "${GPUS:-0}" -eq 1 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mpslog
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  # One job per MPS daemon: stop a daemon left from an earlier job, then start a fresh one. Each rank sets its
  # own CUDA_MPS_ACTIVE_THREAD_PERCENTAGE (100/ranks) before it touches CUDA.
  echo quit | nvidia-cuda-mps-control >/dev/null 2>&1 || true
  sleep 1
  nvidia-cuda-mps-control -d
  trap 'echo quit | nvidia-cuda-mps-control >/dev/null 2>&1 || true; sleep 1' EXIT
fi
"$@"
