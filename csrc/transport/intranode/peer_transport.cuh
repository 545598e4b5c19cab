// Device Transport of the intranode all-to-all (device/delivery.cuh says what a Transport is): every peer's
// buffer is mapped into this process (symmem/ipc_buffer.h), so every byte moves by loads and stores, and
// signals are release stores.
#pragma once

#include <cstdint>

#include "device/primitives.cuh"
#include "device/rank_state.h"

namespace expertwire::device {

struct PeerTransport {
  // peer() never returns null: kernels compile without their put paths.
  static constexpr bool kMayPut = false;

  uint8_t* const* peer_bases;  // [world_size] base of each rank's buffer in this process, ours included

  __host__ __device__ bool load_store_only() const { return true; }

  template <class T>
  __device__ T* peer(int pe, SymmetricRef<T> ref) const {
    return reinterpret_cast<T*>(peer_bases[pe] + ref.offset);
  }

  // Stores need no flush: the release chain of last_block_out orders them before signals.
  __device__ void flush_warp(bool) const { __syncwarp(); }

  __device__ void signal(int pe, SymmetricRef<uint64_t> ref, uint64_t value) const {
    store_release_sys(peer(pe, ref), value);
  }

  __device__ void signal_add(int pe, SymmetricRef<uint64_t> ref, uint64_t value) const {
    red_add_release_sys(peer(pe, ref), value);
  }
};

}  // namespace expertwire::device
