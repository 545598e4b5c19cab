// The intranode counterpart of a symmetric allocation. Each rank's buffer is physical memory from the CUDA
// virtual memory API, exported as a file descriptor, passed to every other rank of the node over a Unix
// socket (symmem/fd_passing.h) and mapped there; plus a device table of each peer's base address.
//
// Why not cudaIpcGetMemHandle on a cudaMalloc: the pull combine, which reads rows the dispatch placed in arrival
// order, measured slower through such mappings than through NVSHMEM's, which come from this same API; through
// these it runs as fast as through NVSHMEM's (docs/performance.md).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/cuda_utils.h"
#include "expertwire/intranode.h"

namespace expertwire {

// Throws RuntimeError naming what is missing when `device` cannot export memory as file descriptors through the
// CUDA virtual memory API, which the intranode buffer needs.
void require_exportable_memory(int device);

// The checks every intranode all-to-all makes before it allocates: no force_puts (peer memory has no puts),
// at most kMaxIntranodeRanks ranks, and memory `device` can export. Throws ConfigError / RuntimeError naming them.
void require_intranode_supported(bool force_puts, int64_t world_size, int device);

// A range of this process's virtual addresses mapped onto one physical allocation (ours or a peer's), readable
// and writable from `device`. Unmapped and released on destruction; the physical memory lives until every
// process has unmapped it.
class MappedAllocation {
 public:
  // Takes over `handle` (a CUmemGenericAllocationHandle): released here, the mapping keeps the memory alive.
  MappedAllocation(unsigned long long handle, size_t bytes, size_t alignment, int device);
  ~MappedAllocation();
  MappedAllocation(const MappedAllocation&) = delete;
  MappedAllocation& operator=(const MappedAllocation&) = delete;

  uint8_t* get() const { return reinterpret_cast<uint8_t*>(address_); }

 private:
  unsigned long long address_ = 0;
  size_t bytes_ = 0;
};

// Collective: every rank of the node constructs (and later destroys) its buffer together. Throws
// ConfigError when the ranks are not on one host, when world_size exceeds kMaxIntranodeRanks or the buffer
// sizes differ, and RuntimeError naming the peer when its GPU cannot reach ours or its memory does not arrive.
class IpcSymmetricBuffer {
 public:
  IpcSymmetricBuffer(size_t bytes, int rank, int world_size, const AllGatherBytes& all_gather);
  ~IpcSymmetricBuffer();
  IpcSymmetricBuffer(const IpcSymmetricBuffer&) = delete;
  IpcSymmetricBuffer& operator=(const IpcSymmetricBuffer&) = delete;

  uint8_t* local() const { return local_->get(); }
  uint8_t* const* device_peer_table() const { return peer_table_.get<uint8_t*>(); }

 private:
  std::unique_ptr<MappedAllocation> local_;
  std::vector<std::unique_ptr<MappedAllocation>> peers_;  // peers' buffers mapped into this process
  DeviceBuffer peer_table_;
};

}  // namespace expertwire
