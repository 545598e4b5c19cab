# Sourced by run_ranks.sh and with_mps.sh: the environment every rank process of this machine runs in.
#   count_gpus                 GPUS = the GPUs nvidia-smi lists (0 without a driver), at most as many as
#                              CUDA_VISIBLE_DEVICES names when it is set
#   export_nvshmem_env         NVSHMEM from the pip wheel on the loader path; no NVLink multicast (it can take a
#                              shared host's GPUs out of service); no remote transport; a 2G symmetric heap.
#                              EXPERTWIRE_REMOTE_TRANSPORT=ucx|libfabric: P2P off and that remote transport instead,
#                              from the libraries in .remote/ (remote_transport.sh; it sets REMOTE_TRANSPORT_EXPORTS)
#   start_fresh_mps            a new CUDA MPS daemon, quit when the calling script exits. One job per daemon:
#                              a daemon left by an earlier job (or its clients) makes the next start fail.

. "$(dirname "${BASH_SOURCE[0]}")/../env.sh"

count_gpus() {
  GPUS=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU ' || true)
  GPUS=${GPUS:-0}
  # CUDA_VISIBLE_DEVICES narrows what CUDA (and an MPS daemon started here) sees: e.g. =0 runs the one-GPU
  # MPS harness on a machine with several GPUs.
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    local visible
    visible=$(printf '%s' "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . || true)
    if [ "$visible" -lt "$GPUS" ]; then GPUS=$visible; fi
  fi
}

export_nvshmem_env() {
  local nv
  nv=$(python3 -c 'import nvidia.nvshmem as m;print(list(m.__path__)[0])' 2>/dev/null || true)
  if [ -n "$nv" ]; then export LD_LIBRARY_PATH="$nv/lib:${LD_LIBRARY_PATH:-}"; fi
  export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
  # Kernels load at start, not at a rank's first launch while a peer's kernel waits for it (tests/distributed.py).
  export CUDA_MODULE_LOADING=${CUDA_MODULE_LOADING:-EAGER}
  export NVSHMEM_SYMMETRIC_SIZE=${NVSHMEM_SYMMETRIC_SIZE:-2G}
  export NVSHMEM_REMOTE_TRANSPORT=${NVSHMEM_REMOTE_TRANSPORT:-none}
  REMOTE_TRANSPORT_EXPORTS=""
  if [ -n "${EXPERTWIRE_REMOTE_TRANSPORT:-}" ]; then
    . "$(dirname "${BASH_SOURCE[0]}")/remote_transport.sh"
    export_remote_transport_env || return 1
  fi
}

start_fresh_mps() {
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mpslog
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  echo quit | nvidia-cuda-mps-control >/dev/null 2>&1 || true
  sleep 1
  nvidia-cuda-mps-control -d
  trap 'echo quit | nvidia-cuda-mps-control >/dev/null 2>&1 || true; sleep 1' EXIT
  # The control daemon starts its server with the first client. NVSHMEM asks it for its servers
  # (get_server_list) to choose between full and limited multi-process-per-GPU support: a rank that asks before
  # any server exists takes the limited mode while the others take the full one, and their collectives then
  # disagree. Start the server now and wait for it.
  echo "start_server -uid $(id -u)" | nvidia-cuda-mps-control >/dev/null 2>&1 || true
  local waited=0
  until [ -n "$(echo get_server_list | nvidia-cuda-mps-control 2>/dev/null)" ]; do
    if [ "$waited" -ge 100 ]; then
      echo "start_fresh_mps: no MPS server after 10 s (log: $CUDA_MPS_LOG_DIRECTORY)" >&2
      return 1
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
}
