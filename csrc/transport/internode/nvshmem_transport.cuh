// Device Transport of the internode all-to-all (device/delivery.cuh says what a Transport is): loads and stores
// to peers NVSHMEM maps into this process (NVLink, same node), NVSHMEM puts and signals to the others (RDMA;
// IBGDA on clusters).
#pragma once

#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>

#include "device/primitives.cuh"
#include "device/rank_state.h"

namespace expertwire::device {

struct NvshmemTransport {
  static constexpr bool kMayPut = true;

  uint8_t* symmetric;          // this rank's symmetric buffer; NVSHMEM translates it for each peer
  uint8_t* const* peer_bases;  // [world_size] load/store address of each peer's buffer, or null
  bool uses_puts;              // some peer is reached only through puts

  __host__ __device__ bool load_store_only() const { return !uses_puts; }

  template <class T>
  __device__ T* peer(int pe, SymmetricRef<T> ref) const {
    uint8_t* base = peer_bases[pe];
    return base == nullptr ? nullptr : reinterpret_cast<T*>(base + ref.offset);
  }

  // Blocking put: the staged row may be rewritten as soon as it returns.
  __device__ void put_warp(int pe, SymmetricRef<uint8_t> dst, const uint8_t* staged, uint64_t bytes) const {
    nvshmemx_putmem_warp(symmetric + dst.offset, staged, bytes, pe);
  }

  // Puts must complete at the peer before the signal that publishes them. A warp that put nothing skips the
  // quiet: through a proxy transport each one is a round trip to the proxy thread. Stores need nothing here: the
  // release chain of last_block_out orders them before that signal. `issued_puts` is the same in every lane.
  __device__ void flush_warp(bool issued_puts) const {
    if (uses_puts && issued_puts) nvshmem_quiet();
    __syncwarp();
  }

  __device__ void signal(int pe, SymmetricRef<uint64_t> ref, uint64_t value) const {
    if (uint64_t* mapped = peer(pe, ref)) {
      store_release_sys(mapped, value);
    } else {
      nvshmemx_signal_op(local(ref), value, NVSHMEM_SIGNAL_SET, pe);
    }
  }

  __device__ void signal_add(int pe, SymmetricRef<uint64_t> ref, uint64_t value) const {
    if (uint64_t* mapped = peer(pe, ref)) {
      red_add_release_sys(mapped, value);
    } else {
      nvshmemx_signal_op(local(ref), value, NVSHMEM_SIGNAL_ADD, pe);
    }
  }

 private:
  // NVSHMEM names a peer's symmetric address by this rank's address of the same object.
  __device__ uint64_t* local(SymmetricRef<uint64_t> ref) const {
    return reinterpret_cast<uint64_t*>(symmetric + ref.offset);
  }
};

}  // namespace expertwire::device
