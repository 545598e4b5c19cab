// The intranode counterpart of a symmetric allocation: one cudaMalloc'd buffer per rank, opened by every
// other rank of the node through CUDA IPC handles, plus a device table of each peer's base address.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/cuda_utils.h"

namespace expertwire {

// All-gather of one byte string per rank: called once on every rank with this rank's bytes, returns every
// rank's bytes in rank order. MPI_Allgather, torch.distributed.all_gather_object, ... provide it.
using AllGatherBytes = std::function<std::vector<std::string>(const std::string& local)>;

// At most this many ranks share peer memory: one node's GPUs (or ranks sharing one GPU under MPS).
inline constexpr int kMaxIntranodeRanks = 8;

// Collective: every rank of the node constructs (and later destroys) its buffer together. Throws
// ConfigError when the ranks are not on one host, when world_size exceeds kMaxIntranodeRanks or the buffer
// sizes differ, and RuntimeError naming the peer when its GPU cannot reach ours.
class IpcSymmetricBuffer {
 public:
  IpcSymmetricBuffer(size_t bytes, int rank, int world_size, const AllGatherBytes& all_gather);
  ~IpcSymmetricBuffer();
  IpcSymmetricBuffer(const IpcSymmetricBuffer&) = delete;
  IpcSymmetricBuffer& operator=(const IpcSymmetricBuffer&) = delete;

  uint8_t* local() const { return local_.get<uint8_t>(); }
  uint8_t* const* device_peer_table() const { return peer_table_.get<uint8_t*>(); }

 private:
  DeviceBuffer local_;
  std::vector<void*> opened_;  // peers' buffers mapped into this process (ours is not among them)
  DeviceBuffer peer_table_;
};

}  // namespace expertwire
