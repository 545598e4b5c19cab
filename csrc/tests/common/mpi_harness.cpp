#include "tests/common/mpi_harness.h"

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "core/cuda_utils.h"
#include "symmem/nvshmem_runtime.h"

namespace expertwire::harness {

MpiSession::MpiSession(int* argc, char*** argv) {
  MPI_Init(argc, argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &world_size_);
  MPI_Comm node;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node);
  MPI_Comm_rank(node, &local_rank_);
  MPI_Comm_free(&node);
}

MpiSession::~MpiSession() { MPI_Finalize(); }

bool select_gpu_or_skip(const MpiSession& mpi, const char* program) {
  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  const bool ok = status == cudaSuccess && devices > 0;
  if (!all_ranks(ok)) {
    if (mpi.rank() == 0) {
      const std::string why = status != cudaSuccess ? " (" + cuda_error_cause(status) + ")" : "";
      std::printf("%s: SKIPPED: no CUDA device visible%s\n", program, why.c_str());
    }
    return false;
  }
  EW_CUDA_CHECK(cudaSetDevice(mpi.local_rank() % devices));
  return true;
}

NvshmemSession::NvshmemSession(const MpiSession& mpi) {
  std::vector<uint8_t> id;
  if (mpi.rank() == 0) id = nvshmem_unique_id();
  uint64_t size = id.size();
  MPI_Bcast(&size, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
  id.resize(size);
  MPI_Bcast(id.data(), int(size), MPI_BYTE, 0, MPI_COMM_WORLD);
  nvshmem_init_with_unique_id(id, mpi.rank(), mpi.world_size());
}

NvshmemSession::~NvshmemSession() { nvshmem_finalize_runtime(); }

void barrier() { MPI_Barrier(MPI_COMM_WORLD); }

int run_reporting_errors(const char* program, int (*run)(int, char**), int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", program, e.what());
    return 2;
  }
}

bool all_ranks(bool value) {
  int local = value ? 1 : 0, global = 0;
  MPI_Allreduce(&local, &global, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
  return global != 0;
}

double max_over_ranks(double value) {
  double global = 0;
  MPI_Allreduce(&value, &global, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return global;
}

uint64_t broadcast_from_root(uint64_t value) {
  MPI_Bcast(&value, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
  return value;
}

std::vector<std::string> all_gather_bytes(const std::string& local) {
  int world = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  const int own_size = int(local.size());
  std::vector<int> sizes(world), displacements(world);
  MPI_Allgather(&own_size, 1, MPI_INT, sizes.data(), 1, MPI_INT, MPI_COMM_WORLD);
  int total = 0;
  for (int r = 0; r < world; ++r) {
    displacements[r] = total;
    total += sizes[r];
  }
  std::string all(size_t(total), '\0');
  MPI_Allgatherv(local.data(), own_size, MPI_BYTE, all.data(), sizes.data(), displacements.data(), MPI_BYTE,
                 MPI_COMM_WORLD);
  std::vector<std::string> out(world);
  for (int r = 0; r < world; ++r) out[r] = all.substr(size_t(displacements[r]), size_t(sizes[r]));
  return out;
}

}  // namespace expertwire::harness
