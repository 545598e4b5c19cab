#!/usr/bin/env bash
# The seed's multi-node launch on one machine: two groups of ranks started as nodes 0 and 1 of one job (NODE_RANK,
# WORLD_SIZE, WORLD_LOCAL_SIZE = WORLD_SIZE / 2, MASTER_ADDR=127.0.0.1, MASTER_PORT), each group running COMMAND,
# under one fresh CUDA MPS daemon when the machine has one GPU:
#   two_groups.sh WORLD_SIZE COMMAND [ARGS...]
#   e.g. EXPERTWIRE_REMOTE_TRANSPORT=ucx-sysmem two_groups.sh 4 python3 -m tests.bench_all_to_all --tokens 1,8
# Each rank's MPS share is 100 / WORLD_SIZE: shares that add up to more than the GPU put NVSHMEM in its "limited
# MPG" mode, which refuses its on-stream collectives. Output lines are prefixed "[node N]".
# Env: TWO_GROUPS_UTS=1 starts each group in UTS and mount namespaces of its own (needs root or CAP_SYS_ADMIN) with
# the host name expertwire-node<N> (in its /etc/hosts), so that the groups are two hosts to NVSHMEM, their ranks'
# MPS control clients one at a time unless TWO_GROUPS_SERIAL_MPS_CLIENT=0, and a /dev/shm of its own (a tmpfs, as
# each host has one: NVSHMEM names its host-memory heap the same on every host) unless TWO_GROUPS_PRIVATE_SHM=0;
# GROUPS_TIMEOUT_S (default 600) bounds each group; MASTER_PORT (default 29533); the NVSHMEM environment as
# run_ranks.sh (EXPERTWIRE_REMOTE_TRANSPORT included).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: two_groups.sh WORLD_SIZE COMMAND [ARGS...]" >&2; exit 2; }
WORLD=$1
shift
if ! [[ $WORLD =~ ^[0-9]+$ ]] || [ "$WORLD" -lt 2 ] || [ $((WORLD % 2)) -ne 0 ]; then
  echo "two_groups.sh: WORLD_SIZE must be an even number >= 2, got '$WORLD'" >&2
  exit 2
fi

. "$(dirname "$0")/rank_env.sh"
export_nvshmem_env
count_gpus
if [ "$GPUS" -eq 1 ]; then
  start_fresh_mps
  export CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$((100 / WORLD))
fi
export WORLD_SIZE=$WORLD WORLD_LOCAL_SIZE=$((WORLD / 2)) MASTER_ADDR=127.0.0.1 MASTER_PORT=${MASTER_PORT:-29533}

if [ "${TWO_GROUPS_UTS:-0}" = 1 ]; then
  # A host name of its own resolves nowhere: the bootstraps (gloo's, NVSHMEM's unique-id sockets) then take the
  # loopback interface, and each group's /etc/hosts (bind-mounted in a mount namespace of its own) names it.
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
  export NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=${NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME:-lo}
  # The ranks' MPS control clients one at a time (scripts/device/mps_client), where there is one.
  if [ "${TWO_GROUPS_SERIAL_MPS_CLIENT:-1}" = 1 ] && real_mps_control=$(command -v nvidia-cuda-mps-control); then
    export EXPERTWIRE_REAL_MPS_CONTROL=$real_mps_control PATH="$(cd "$(dirname "$0")" && pwd)/mps_client:$PATH"
  fi
fi

run_group() {
  local node=$1
  shift
  if [ "${TWO_GROUPS_UTS:-0}" = 1 ]; then
    NODE_RANK=$node timeout "${GROUPS_TIMEOUT_S:-600}" unshare --uts --mount bash -c '
      name=expertwire-node$NODE_RANK
      hostname "$name" || exit
      hosts=$(mktemp) && { cat /etc/hosts; echo "127.0.0.1 $name"; } > "$hosts" && mount --bind "$hosts" /etc/hosts || exit
      rm -f "$hosts"  # the mount keeps the file
      if [ "${TWO_GROUPS_PRIVATE_SHM:-1}" = 1 ]; then mount -t tmpfs tmpfs /dev/shm || exit; fi
      exec "$@"' group "$@" 2>&1 | sed -u "s/^/[node $node] /"
  else
    NODE_RANK=$node timeout "${GROUPS_TIMEOUT_S:-600}" "$@" 2>&1 | sed -u "s/^/[node $node] /"
  fi
}

run_group 1 "$@" &
other=$!
status0=0
run_group 0 "$@" || status0=$?
status1=0
wait "$other" || status1=$?
echo "two_groups.sh: node 0 exit $status0, node 1 exit $status1"
[ "$status0" -eq 0 ] && [ "$status1" -eq 0 ]
