// Device Transport of the internode all-to-all: loads and stores to peers NVSHMEM maps into this process
// (NVLink, same node), NVSHMEM puts and signals to the others (RDMA; IBGDA on clusters).
#pragma once

#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>

#include "device/primitives.cuh"

namespace expertwire::device {

struct NvshmemTransport {
  static constexpr bool kMayPut = true;

  uint8_t* symmetric;           // this rank's symmetric buffer; NVSHMEM translates it for each peer
  uint8_t* const* peer_bases;   // [world_size] load/store address of each peer's buffer, or null
  bool uses_puts;               // some peer is reached only through puts

  bool load_store_only() const { return !uses_puts; }

  __device__ uint8_t* peer_address(int pe, uint64_t offset) const {
    uint8_t* base = peer_bases[pe];
    return base == nullptr ? nullptr : base + offset;
  }

  // Blocking put: the staged row may be rewritten as soon as it returns.
  __device__ void put_warp(int pe, uint64_t offset, const uint8_t* staged, uint64_t bytes) const {
    nvshmemx_putmem_warp(symmetric + offset, staged, bytes, pe);
  }

  // Puts must complete at the peer before the signal that publishes them. Stores need nothing here: the
  // release chain of last_block_out orders them before that signal.
  __device__ void flush_warp() const {
    if (uses_puts) nvshmem_quiet();
    __syncwarp();
  }

  __device__ void signal(int pe, uint64_t offset, uint64_t value) const {
    if (uint8_t* base = peer_bases[pe]) {
      store_release_sys(reinterpret_cast<uint64_t*>(base + offset), value);
    } else {
      nvshmemx_signal_op(reinterpret_cast<uint64_t*>(symmetric + offset), value, NVSHMEM_SIGNAL_SET, pe);
    }
  }

  __device__ void signal_add(int pe, uint64_t offset, uint64_t value) const {
    if (uint8_t* base = peer_bases[pe]) {
      red_add_release_sys(reinterpret_cast<uint64_t*>(base + offset), value);
    } else {
      nvshmemx_signal_op(reinterpret_cast<uint64_t*>(symmetric + offset), value, NVSHMEM_SIGNAL_ADD, pe);
    }
  }
};

}  // namespace expertwire::device
