#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck on test_all_to_all with 2 ranks, for each transport (intranode,
# internode, and internode-puts, the put path that runs between nodes): prints the test's closing line and each rank's sanitizer summary line per run, and exits non-zero
# when a run fails or a summary reports anything.
#   bash scripts/device/sanitize.sh        (builds first when build/test_all_to_all is missing)
# Each rank process runs under its own compute-sanitizer (mpirun ... compute-sanitizer --tool T test_all_to_all).
# The ranks share one GPU without an MPS daemon (RANKS_MPS=0): compute-sanitizer's documentation lists no
# support for MPS clients, while separate CUDA contexts are an ordinary target. The contexts time-slice the GPU,
# so a kernel waiting for its peer still sees it, only later: the device-side wait bound is raised to match.
# NVSHMEM takes its heap from cudaMalloc instead of the CUDA VMM API (NVSHMEM_DISABLE_CUDA_VMM=1), which the
# sanitizer tracks as ordinary device allocations.
# Env: SANITIZER (path of compute-sanitizer), SANITIZE_TOOLS (default "memcheck racecheck"),
# SANITIZE_TRANSPORTS (default "intranode internode internode-puts"), SANITIZE_ARGS (test_all_to_all arguments, default
# "--configs 2 --iterations 2"), SANITIZE_TIMEOUT_S (per run, default 1200). Logs: build/sanitize/.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/env.sh

if ! (nvidia-smi -L 2>/dev/null | grep -q '^GPU '); then
  echo "SKIPPED: no GPU visible (nvidia-smi lists none); compute-sanitizer needs a CUDA device"
  exit 77
fi

# The CUDA toolkit's copy, else the pip wheel nvidia-cuda-sanitizer-api (installed, or unpacked into .deps/sanitizer
# with `python3 -m pip install --target .deps/sanitizer nvidia-cuda-sanitizer-api` on a machine with a registry).
find_sanitizer() {
  local wheel
  wheel=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13/bin/compute-sanitizer"))' \
    2>/dev/null || true)
  for candidate in "${SANITIZER:-}" "$(command -v compute-sanitizer || true)" /usr/local/cuda/bin/compute-sanitizer \
      /usr/local/cuda/compute-sanitizer/compute-sanitizer "$wheel" .deps/sanitizer/nvidia/cu13/bin/compute-sanitizer; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then
      echo "$candidate"
      return
    fi
  done
}
SAN=$(find_sanitizer)
if [ -z "$SAN" ]; then
  echo "sanitize.sh: compute-sanitizer not found (SANITIZER, PATH, /usr/local/cuda, the nvidia-cuda-sanitizer-api" \
       "wheel, .deps/sanitizer)" >&2
  exit 2
fi
echo "sanitize.sh: $("$SAN" --version | head -1) ($SAN)"

[ -x build/test_all_to_all ] || bash scripts/device/build.sh
LOGS=build/sanitize
mkdir -p "$LOGS"
read -r -a TEST_ARGS <<< "${SANITIZE_ARGS:---configs 2 --iterations 2}"

# Instrumented kernels run many times slower, and time-sliced peers answer late: a long wait bound, a smaller
# grid (less to instrument; every block stays resident) and a heap well inside the GPU's memory.
export RANKS_MPS=0 RANKS_TIMEOUT_S=${SANITIZE_TIMEOUT_S:-1200} NVSHMEM_SYMMETRIC_SIZE=${NVSHMEM_SYMMETRIC_SIZE:-1G}
export RANKS_EXPORT="EXPERTWIRE_TIMEOUT_MS=${EXPERTWIRE_TIMEOUT_MS:-600000} NVSHMEM_DISABLE_CUDA_VMM=1
  EXPERTWIRE_NUM_BLOCKS=${EXPERTWIRE_NUM_BLOCKS:-16} EXPERTWIRE_BLOCK_THREADS=${EXPERTWIRE_BLOCK_THREADS:-256}"

failed=0
for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
  for transport in ${SANITIZE_TRANSPORTS:-intranode internode internode-puts}; do
    name=$tool-$transport
    rm -f "$LOGS/$name".rank*.log
    echo "== $tool, $transport transport, 2 ranks"
    status=0
    scripts/device/run_ranks.sh 2 "$SAN" --tool "$tool" --error-exitcode 86 --print-limit 50 \
      --log-file "$LOGS/$name.rank%q{OMPI_COMM_WORLD_RANK}.log" \
      build/test_all_to_all --transport "$transport" "${TEST_ARGS[@]}" > "$LOGS/$name.out" 2>&1 || status=$?
    echo "   test_all_to_all: $(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$LOGS/$name.out" || echo 'no closing line')"
    for log in "$LOGS/$name".rank*.log; do
      [ -f "$log" ] || continue
      rank=${log##*.rank}
      echo "   rank ${rank%.log}: $(grep -hE '(ERROR|RACECHECK) SUMMARY' "$log" || echo 'no summary line')"
      if grep -qE 'ERROR SUMMARY: [1-9]|RACECHECK SUMMARY: [1-9]' "$log"; then failed=1; fi
    done
    if [ "$status" -ne 0 ]; then
      echo "   exit status $status: see $LOGS/$name.out and $LOGS/$name.rank*.log"
      failed=1
    fi
  done
done
[ "$failed" -eq 0 ] && echo "sanitize.sh: no errors, no hazards" || echo "sanitize.sh: FAILED"
exit "$failed"
