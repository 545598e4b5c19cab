// Device Transport of the intranode all-to-all: every peer's buffer is mapped into this process
// (symmem/ipc_buffer.h), so every byte moves by loads and stores, and signals are release stores.
#pragma once

#include <cstdint>

#include "device/primitives.cuh"

namespace expertwire::device {

struct PeerTransport {
  // peer_address never returns null: kernels compile without their put paths.
  static constexpr bool kMayPut = false;

  uint8_t* const* peer_bases;  // [world_size] base of each rank's buffer in this process, ours included

  bool load_store_only() const { return true; }

  __device__ uint8_t* peer_address(int pe, uint64_t offset) const { return peer_bases[pe] + offset; }

  // Stores need no flush: the release chain of last_block_out orders them before signals.
  __device__ void flush_warp() const { __syncwarp(); }

  __device__ void signal(int pe, uint64_t offset, uint64_t value) const {
    store_release_sys(reinterpret_cast<uint64_t*>(peer_bases[pe] + offset), value);
  }

  __device__ void signal_add(int pe, uint64_t offset, uint64_t value) const {
    red_add_release_sys(reinterpret_cast<uint64_t*>(peer_bases[pe] + offset), value);
  }
};

}  // namespace expertwire::device
