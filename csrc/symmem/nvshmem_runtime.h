// NVSHMEM bootstrap by unique id and the RAII owner of one symmetric allocation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include <cuda_runtime.h>

#include "core/cuda_utils.h"

namespace expertwire {

// The bytes of a fresh NVSHMEM unique id: created on one rank, broadcast by any means (MPI,
// torch.distributed), then passed to nvshmem_init_with_unique_id on every rank.
std::vector<uint8_t> nvshmem_unique_id();
size_t nvshmem_unique_id_bytes();
void nvshmem_init_with_unique_id(const std::vector<uint8_t>& unique_id, int rank, int world_size);
bool nvshmem_initialized();
// Throws RuntimeError, saying what to call, when NVSHMEM is not initialized.
void require_nvshmem_initialized();
void nvshmem_finalize_runtime();
int nvshmem_rank();
int nvshmem_world_size();
void nvshmem_barrier_all_ranks();
// Device-side barrier of all ranks, ordered on `stream` (benchmarks start every rank together with it).
void nvshmem_barrier_on_stream(cudaStream_t stream);
// NVSHMEM's own all-to-all on `stream`, the baseline benchmarks compare against: block r of `source` (bytes_per_rank
// bytes) lands in block `my rank` of rank r's `dest`. Both must be symmetric (NvshmemSymmetricBuffer) and hold
// world_size blocks. Collective.
void nvshmem_alltoall_on_stream(void* dest, const void* source, size_t bytes_per_rank, cudaStream_t stream);
// Every rank's `local` words, in rank order (each rank passes as many): each rank reads every rank's from
// symmetric scratch of its own, with gets between two barriers, not a collective (NVSHMEM refuses its collectives
// when ranks share a GPU without MPS). Collective.
std::vector<std::vector<uint64_t>> nvshmem_all_gather_words(const std::vector<uint64_t>& local);
// Whether `local` is true on some rank. Collective.
bool nvshmem_on_any_rank(bool local);

// One nvshmem_malloc'd buffer, zeroed, plus a device table of the address at which this process can load
// and store each peer's copy (nvshmem_ptr; null where only puts reach the peer). Allocation and release
// are collective: every rank constructs and destroys its buffer together.
class NvshmemSymmetricBuffer {
 public:
  // Throws RuntimeError when NVSHMEM is not initialized. `force_puts` leaves the peer table empty so every
  // byte travels through NVSHMEM puts, as it does between nodes.
  NvshmemSymmetricBuffer(size_t bytes, bool force_puts);
  ~NvshmemSymmetricBuffer();
  NvshmemSymmetricBuffer(const NvshmemSymmetricBuffer&) = delete;
  NvshmemSymmetricBuffer& operator=(const NvshmemSymmetricBuffer&) = delete;

  uint8_t* local() const { return base_; }
  uint8_t* const* device_peer_table() const { return peer_table_.get<uint8_t*>(); }
  bool uses_puts() const { return uses_puts_; }  // some peer of this rank is reached only through puts

 private:
  uint8_t* base_ = nullptr;
  DeviceBuffer peer_table_;
  bool uses_puts_ = false;
};

}  // namespace expertwire
