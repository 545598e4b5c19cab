// test_nvshmem_signal: the smallest proof that the multi-rank harness and NVSHMEM work. Each rank puts a
// value with a signal into every other rank's symmetric buffer, then waits (bounded) for the signal of
// every peer and checks the value that arrived. `mpirun -np N ./test_nvshmem_signal [--mode M]`.
// --mode tells which NVSHMEM operations carry the exchange, to tell apart what a remote transport supports:
//   signal    (default) nvshmem_putmem_signal_nbi with NVSHMEM_SIGNAL_SET (an atomic on the proxy path)
//   put-flag  the value by nvshmem_putmem_nbi, nvshmem_fence, then a flag put the same way (no atomic of ours)
//   put       the value by nvshmem_putmem_nbi and nvshmem_quiet; the ranks meet at an MPI barrier, then check
// The last two also keep nvshmem_barrier_all out of the test (NVSHMEM's own init, nvshmem_calloc and
// nvshmem_free still run its barrier). Rank 0 first prints how many peers nvshmem_ptr maps (load/store reach).
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdio>
#include <string>
#include <vector>

#include "core/cuda_utils.h"
#include "core/error.h"
#include "device/primitives.cuh"
#include "symmem/nvshmem_runtime.h"
#include "tests/common/mpi_harness.h"

namespace expertwire {
namespace {

constexpr uint64_t kTimeoutNs = 10'000'000'000ull;

__host__ __device__ uint64_t expected_value(int from, int to) { return 1000003ull * (from + 1) + to; }

enum class Mode { kSignal, kPutFlag, kPut };

Mode parse_mode(int argc, char** argv) {
  Mode mode = Mode::kSignal;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    EW_REQUIRE(arg == "--mode" && i + 1 < argc, "test_nvshmem_signal: unknown argument '", arg,
               "' (known: --mode signal|put-flag|put)");
    const std::string value = argv[++i];
    if (value == "signal") mode = Mode::kSignal;
    else if (value == "put-flag") mode = Mode::kPutFlag;
    else if (value == "put") mode = Mode::kPut;
    else EW_THROW(ConfigError, "test_nvshmem_signal: --mode ", value, ": expected signal, put-flag or put");
  }
  return mode;
}

const char* mode_name(Mode mode) {
  return mode == Mode::kSignal ? "signal" : mode == Mode::kPutFlag ? "put-flag" : "put";
}

// slots[p] receives the value from rank p; signals[p] says it arrived; outgoing[p] is the put's source and
// outgoing[ranks] the flag's (put-flag).
__global__ void exchange(Mode mode, uint64_t* slots, uint64_t* signals, uint64_t* outgoing, uint64_t* received,
                         ErrorRecord* error) {
  const int me = nvshmem_my_pe(), ranks = nvshmem_n_pes();
  if (threadIdx.x == 0) outgoing[ranks] = 1;
  __syncthreads();
  for (int peer = threadIdx.x; peer < ranks; peer += blockDim.x) {
    if (peer == me) continue;
    outgoing[peer] = expected_value(me, peer);
    if (mode == Mode::kSignal) {
      nvshmem_putmem_signal_nbi(&slots[me], &outgoing[peer], sizeof(uint64_t), &signals[me], 1, NVSHMEM_SIGNAL_SET,
                                peer);
    } else {
      nvshmem_putmem_nbi(&slots[me], &outgoing[peer], sizeof(uint64_t), peer);
    }
  }
  if (mode == Mode::kPutFlag) {
    nvshmem_fence();  // each peer's value before its flag (the same thread puts both)
    for (int peer = threadIdx.x; peer < ranks; peer += blockDim.x) {
      if (peer != me) nvshmem_putmem_nbi(&signals[me], &outgoing[ranks], sizeof(uint64_t), peer);
    }
  }
  nvshmem_quiet();
  if (mode == Mode::kPut) return;  // the host reads slots after the ranks meet
  for (int peer = threadIdx.x; peer < ranks; peer += blockDim.x) {
    if (peer == me) continue;
    const bool arrived = device::wait_signal(&signals[peer], kTimeoutNs, error, Phase::kDispatchRecv, peer) != 0;
    received[peer] = arrived ? slots[peer] : 0;
  }
}

int run(int argc, char** argv) {
  harness::MpiSession mpi(&argc, &argv);
  const Mode mode = parse_mode(argc, argv);
  if (!harness::select_gpu_or_skip(mpi, "test_nvshmem_signal")) return harness::kSkippedExitCode;
  harness::NvshmemSession nvshmem(mpi);
  const int ranks = nvshmem_n_pes(), me = nvshmem_my_pe();
  auto* slots = static_cast<uint64_t*>(nvshmem_calloc(ranks, sizeof(uint64_t)));
  auto* signals = static_cast<uint64_t*>(nvshmem_calloc(ranks, sizeof(uint64_t)));
  auto* outgoing = static_cast<uint64_t*>(nvshmem_calloc(ranks + 1, sizeof(uint64_t)));
  EW_REQUIRE(slots && signals && outgoing, "nvshmem_calloc failed");
  DeviceBuffer received(ranks * sizeof(uint64_t));
  MappedHostObject<ErrorRecord> error;
  auto meet = [&] {
    if (mode == Mode::kSignal) nvshmem_barrier_all();
    else harness::barrier();
  };

  int mapped = 0;
  for (int peer = 0; peer < ranks; ++peer) mapped += peer != me && nvshmem_ptr(slots, peer) != nullptr;
  int mapped_total = 0;
  MPI_Reduce(&mapped, &mapped_total, 1, MPI_INT, MPI_SUM, 0, MPI_COMM_WORLD);
  if (me == 0) {
    std::printf("test_nvshmem_signal: mode %s; nvshmem_ptr maps %d of %d peer pairs (load/store reach)\n",
                mode_name(mode), mapped_total, ranks * (ranks - 1));
    std::fflush(stdout);
  }
  meet();

  exchange<<<1, 128>>>(mode, slots, signals, outgoing, received.get<uint64_t>(), error.device());
  EW_CUDA_CHECK(cudaGetLastError());
  EW_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<uint64_t> got(ranks);
  if (mode == Mode::kPut) {
    meet();  // every rank's puts have completed (nvshmem_quiet) before any rank reads
    EW_CUDA_CHECK(cudaMemcpy(got.data(), slots, ranks * sizeof(uint64_t), cudaMemcpyDefault));
  } else {
    EW_CUDA_CHECK(cudaMemcpy(got.data(), received.get(), ranks * sizeof(uint64_t), cudaMemcpyDeviceToHost));
  }

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
  meet();
  nvshmem_free(outgoing);
  nvshmem_free(signals);
  nvshmem_free(slots);
  if (me == 0) {
    const char* what = mode == Mode::kSignal ? "signalled puts" : mode == Mode::kPutFlag ? "flagged puts" : "puts";
    std::printf("test_nvshmem_signal: %d ranks exchanged %d %s\n", ranks, sums[0] + sums[1], what);
    std::printf("%d passed, %d failed\n", sums[0], sums[1]);
  }
  return harness::all_ranks(failed == 0) ? 0 : 1;
}

}  // namespace
}  // namespace expertwire

int main(int argc, char** argv) {
  return expertwire::harness::run_reporting_errors("test_nvshmem_signal", expertwire::run, argc, argv);
}
