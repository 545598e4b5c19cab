#!/usr/bin/env bash
# Run NP ranks of an MPI program on this machine's GPUs.
#   run_ranks.sh NP COMMAND [ARGS...]        e.g.  run_ranks.sh 8 build/test_all_to_all
# One GPU and NP > 1: every rank shares it under a fresh CUDA MPS daemon (one mpirun job per daemon), or,
# with RANKS_MPS=0, as separate CUDA contexts that time-slice the GPU (slower, but tools that do not support
# MPS clients, such as compute-sanitizer, can wrap each rank).
# Several GPUs: one rank per GPU, no MPS (NP must not exceed the GPU count).
# No GPU: prints why and exits 77, which ctest reports as skipped.
# Env: RANKS_TIMEOUT_S (default 300) bounds the whole job; RANKS_EXPORT="A=1 B=2" adds -x variables;
# RANKS_MPS=0 shares one GPU without MPS; EXPERTWIRE_REMOTE_TRANSPORT=ucx|libfabric runs the ranks through that
# NVSHMEM remote transport with P2P off (rank_env.sh, remote_transport.sh).
set -euo pipefail
NP=${1:?usage: run_ranks.sh NP COMMAND [ARGS...]}; shift
[ $# -ge 1 ] || { echo "usage: run_ranks.sh NP COMMAND [ARGS...]" >&2; exit 2; }

. "$(dirname "$0")/rank_env.sh"
count_gpus
if [ "$GPUS" -eq 0 ]; then
  echo "SKIPPED: no GPU visible (nvidia-smi lists none); $(basename "$1") needs a CUDA device"
  exit 77
fi

export_nvshmem_env
EXPORTS=(-x NVSHMEM_DISABLE_NVLS -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_SYMMETRIC_SIZE
         -x NVSHMEM_REMOTE_TRANSPORT -x LD_LIBRARY_PATH)
for kv in ${RANKS_EXPORT:-}; do EXPORTS+=(-x "$kv"); done
# EXPERTWIRE_REMOTE_TRANSPORT=ucx|libfabric: the remote transport's settings (remote_transport.sh), each once.
for v in $REMOTE_TRANSPORT_EXPORTS; do
  case " ${EXPORTS[*]} " in *" $v "*) ;; *) EXPORTS+=(-x "$v") ;; esac
done

if [ "$GPUS" -eq 1 ] && [ "$NP" -gt 1 ] && [ "${RANKS_MPS:-1}" = 0 ]; then
  echo "run_ranks.sh: RANKS_MPS=0: $NP ranks time-slice one GPU as separate CUDA contexts (no MPS daemon)" >&2
  unset CUDA_MPS_PIPE_DIRECTORY  # ranks inherit this environment: keep them off any daemon it names
elif [ "$GPUS" -eq 1 ] && [ "$NP" -gt 1 ]; then
  start_fresh_mps
  export CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$(( 100 / NP ))
  EXPORTS+=(-x CUDA_MPS_PIPE_DIRECTORY -x CUDA_MPS_ACTIVE_THREAD_PERCENTAGE)
elif [ "$NP" -gt "$GPUS" ]; then
  echo "run_ranks.sh: $NP ranks but $GPUS GPUs; with several GPUs each rank gets its own" >&2
  exit 2
fi

timeout --signal=TERM --kill-after=10 "${RANKS_TIMEOUT_S:-300}" \
  mpirun --allow-run-as-root --oversubscribe -np "$NP" "${EXPORTS[@]}" "$@"
