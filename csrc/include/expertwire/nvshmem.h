// NVSHMEM's bootstrap by unique id, and the few collectives programs around the all-to-all need.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace expertwire {

// The bytes of a fresh NVSHMEM unique id: created on one rank, broadcast by any means (MPI,
// torch.distributed), then passed to nvshmem_init_with_unique_id on every rank.
std::vector<uint8_t> nvshmem_unique_id();
size_t nvshmem_unique_id_bytes();
// Joins the job `unique_id` names as `rank` of `world_size`; blocks until every rank has joined. Throws
// ConfigError for a unique id of the wrong size or all zeros (one that was never filled by the broadcast).
void nvshmem_init_with_unique_id(const std::vector<uint8_t>& unique_id, int rank, int world_size);
bool nvshmem_initialized();
// In a process where NVSHMEM already runs, started by another library (nvshmem4py's nvshmem.core.init, say):
// makes this library's NVSHMEM device code usable (NVSHMEM keeps one device state per linked device library and
// fills in ours here) and joins nothing; it holds one more of NVSHMEM's references, which
// nvshmem_finalize_runtime gives back (NVSHMEM keeps running until its owner finalizes too). Throws RuntimeError
// when NVSHMEM is not running. Every internode object's constructor attaches (nothing happens where this
// library initialized NVSHMEM or attached already).
void nvshmem_attach_to_running();
// Throws RuntimeError, saying what to call, when NVSHMEM is not initialized.
void require_nvshmem_initialized();
// Finalizes NVSHMEM where this library initialized it; after nvshmem_attach_to_running, drops that reference.
void nvshmem_finalize_runtime();
// For a process that is ending: from now on a symmetric allocation's release frees nothing, since nvshmem_free is
// collective (a barrier) and would wait forever for a peer that died or stopped, or that ends without releasing
// its own. The heap goes with the process. Python calls it at interpreter exit, before the objects still alive
// are released.
void nvshmem_release_without_collectives();
// These throw RuntimeError when NVSHMEM is not initialized.
int nvshmem_rank();
int nvshmem_world_size();
void nvshmem_barrier_all_ranks();
// Device-side barrier of all ranks, ordered on `stream` (benchmarks start every rank together with it).
void nvshmem_barrier_on_stream(cudaStream_t stream);
// NVSHMEM's own all-to-all on `stream`, the baseline benchmarks compare against: block r of `source`
// (bytes_per_rank bytes) lands in block `my rank` of rank r's `dest`. Both must be symmetric (nvshmem_malloc)
// and hold world_size blocks. Collective.
void nvshmem_alltoall_on_stream(void* dest, const void* source, size_t bytes_per_rank, cudaStream_t stream);

}  // namespace expertwire
