// test_nvshmem_signal: the smallest proof that the multi-rank harness and NVSHMEM work. Each rank puts a
// value with a signal into every other rank's symmetric buffer, then waits (bounded) for the signal of
// every peer and checks the value that arrived. `mpirun -np N ./test_nvshmem_signal`.
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdio>
#include <string>
#include <vector>

#include "core/cuda_utils.h"
#include "device/primitives.cuh"
#include "symmem/nvshmem_runtime.h"
#include "tests/common/mpi_harness.h"

namespace expertwire {
namespace {

constexpr uint64_t kTimeoutNs = 10'000'000'000ull;

__host__ __device__ uint64_t expected_value(int from, int to) { return 1000003ull * (from + 1) + to; }

// slots[p] receives the value from rank p; signals[p] says it arrived; outgoing[p] is the put's source.
__global__ void exchange(uint64_t* slots, uint64_t* signals, uint64_t* outgoing, uint64_t* received,
                         ErrorRecord* error) {
  const int me = nvshmem_my_pe(), ranks = nvshmem_n_pes();
  for (int peer = threadIdx.x; peer < ranks; peer += blockDim.x) {
    if (peer == me) continue;
    outgoing[peer] = expected_value(me, peer);
    nvshmem_putmem_signal_nbi(&slots[me], &outgoing[peer], sizeof(uint64_t), &signals[me], 1, NVSHMEM_SIGNAL_SET, peer);
  }
  nvshmem_quiet();
  for (int peer = threadIdx.x; peer < ranks; peer += blockDim.x) {
    if (peer == me) continue;
    const bool arrived = device::wait_signal(&signals[peer], kTimeoutNs, error, Phase::kDispatchRecv, peer) != 0;
    received[peer] = arrived ? slots[peer] : 0;
  }
}

int run(int argc, char** argv) {
  harness::MpiSession mpi(&argc, &argv);
  if (!harness::select_gpu_or_skip(mpi, "test_nvshmem_signal")) return harness::kSkippedExitCode;
  harness::NvshmemSession nvshmem(mpi);
  const int ranks = nvshmem_n_pes(), me = nvshmem_my_pe();
  auto* slots = static_cast<uint64_t*>(nvshmem_calloc(ranks, sizeof(uint64_t)));
  auto* signals = static_cast<uint64_t*>(nvshmem_calloc(ranks, sizeof(uint64_t)));
  auto* outgoing = static_cast<uint64_t*>(nvshmem_calloc(ranks, sizeof(uint64_t)));
  EW_REQUIRE(slots && signals && outgoing, "nvshmem_calloc failed");
  DeviceBuffer received(ranks * sizeof(uint64_t));
  MappedHostObject<ErrorRecord> error;
  nvshmem_barrier_all();

  exchange<<<1, 128>>>(slots, signals, outgoing, received.get<uint64_t>(), error.device());
  EW_CUDA_CHECK(cudaGetLastError());
  EW_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<uint64_t> got(ranks);
  EW_CUDA_CHECK(cudaMemcpy(got.data(), received.get(), ranks * sizeof(uint64_t), cudaMemcpyDeviceToHost));

  int passed = 0, failed = 0;
  for (int peer = 0; peer < ranks; ++peer) {
    if (peer == me) continue;
    if (got[peer] == expected_value(peer, me)) {
      ++passed;
    } else {
      ++failed;
      std::printf("rank %d: from rank %d got %llu, expected %llu%s\n", me, peer, (unsigned long long)got[peer],
                  (unsigned long long)expected_value(peer, me),
                  error.host()->code != ErrorCode::kNone ? " (timed out)" : "");
    }
  }
  int totals[2] = {passed, failed}, sums[2] = {0, 0};
  MPI_Reduce(totals, sums, 2, MPI_INT, MPI_SUM, 0, MPI_COMM_WORLD);
  nvshmem_barrier_all();
  nvshmem_free(outgoing);
  nvshmem_free(signals);
  nvshmem_free(slots);
  if (me == 0) {
    std::printf("test_nvshmem_signal: %d ranks exchanged %d signalled puts\n", ranks, sums[0] + sums[1]);
    std::printf("%d passed, %d failed\n", sums[0], sums[1]);
  }
  return harness::all_ranks(failed == 0) ? 0 : 1;
}

}  // namespace
}  // namespace expertwire

int main(int argc, char** argv) {
  return expertwire::harness::run_reporting_errors("test_nvshmem_signal", expertwire::run, argc, argv);
}
