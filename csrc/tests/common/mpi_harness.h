// What every multi-rank program (tests, benchmark) needs: MPI, one GPU per rank (or a shared one under
// MPS), NVSHMEM bootstrapped from a unique id broadcast over MPI, and agreement across ranks.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <string>
#include <vector>

namespace expertwire::harness {

class MpiSession {
 public:
  MpiSession(int* argc, char*** argv);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  int local_rank() const { return local_rank_; }

 private:
  int rank_ = 0;
  int world_size_ = 1;
  int local_rank_ = 0;
};

// Exit code of a program that skipped its tests (ctest's SKIP_RETURN_CODE, as run_ranks.sh uses it).
inline constexpr int kSkippedExitCode = 77;

// Selects local_rank % device_count as this rank's GPU (every rank shares GPU 0 when only one is visible,
// as under MPS). When some rank sees no CUDA device, rank 0 prints "<program>: SKIPPED: <reason>" and it
// returns false.
bool select_gpu_or_skip(const MpiSession& mpi, const char* program);

// NVSHMEM for the lifetime of the object: rank 0 makes a unique id, MPI broadcasts it, all ranks init.
class NvshmemSession {
 public:
  explicit NvshmemSession(const MpiSession& mpi);
  ~NvshmemSession();
  NvshmemSession(const NvshmemSession&) = delete;
  NvshmemSession& operator=(const NvshmemSession&) = delete;
};

void barrier();  // every rank reaches this point before any leaves it
// main() of every multi-rank program: run(argc, argv), or "<program>: <what>" on stderr and exit code 2 when
// it throws.
int run_reporting_errors(const char* program, int (*run)(int, char**), int argc, char** argv);

bool all_ranks(bool value);           // logical AND over ranks
double max_over_ranks(double value);  // maximum over ranks
uint64_t broadcast_from_root(uint64_t value);
// Every rank's bytes in rank order (MPI_Allgatherv): the AllGatherBytes of the intranode transport.
std::vector<std::string> all_gather_bytes(const std::string& local);

}  // namespace expertwire::harness
