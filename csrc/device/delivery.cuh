// Sending over a Transport: rows to a peer's symmetric buffer, and a block's arrival signal. Every phase that
// writes into peers goes through these two.
//
// A Transport (transport/*/..._transport.cuh) says how bytes reach a peer's symmetric buffer:
//   static constexpr bool kMayPut                    false: peer() never returns nullptr
//   bool load_store_only()                           every peer has a load/store address
//   T* peer(int pe, SymmetricRef<T>)                 load/store address of the peer's copy, or nullptr
//   void put_warp(int pe, SymmetricRef<uint8_t>, const uint8_t* staged, uint64_t bytes)   for nullptr peers
//   void flush_warp(bool issued_puts)                this warp's writes complete before a later signal
//   void signal(int pe, SymmetricRef<uint64_t>, uint64_t value)       set, with release
//   void signal_add(int pe, SymmetricRef<uint64_t>, uint64_t value)   add, with release
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "device/primitives.cuh"
#include "device/rank_state.h"

namespace expertwire::device {

// Writes one row to `dst` of peer `pe` with the whole warp. `write(address)` produces the row there: straight
// into the peer's memory when it is mapped, else once into `staging` (`staged` remembers it across
// destinations) and from there by a put. With `staged` already true, `staging` is the row itself, in this
// rank's symmetric buffer, and is only read. Returns whether it put (the same in every lane).
template <class Transport, class WriteRow>
__device__ __forceinline__ bool deliver_row(const Transport& transport, int pe, SymmetricRef<uint8_t> dst,
                                            uint64_t bytes, uint8_t* staging, bool& staged, WriteRow write) {
  uint8_t* direct = transport.peer(pe, dst);
  if (!Transport::kMayPut || direct != nullptr) {
    write(direct);
    return false;
  }
  if constexpr (Transport::kMayPut) {
    if (!staged) {
      write(staging);
      // What reads the staged row (a proxy thread, a NIC) is outside this GPU: every lane's part of it must be
      // visible at system scope before the put is issued, not only the issuing lane's.
      __threadfence_system();
      __syncwarp();
      staged = true;
    }
    transport.put_warp(pe, dst, staging, bytes);
  }
  return true;
}

// Tells every rank that this block's part of a phase is written: its ArrivalSignal share of `signal` (the
// sender's own slot in each rank's array), added with release after the block's barrier, so it carries every
// thread's writes (release is cumulative). Call with the whole block, after the block's puts are flushed.
// Where some peer takes puts, each signal is a remote atomic (through a proxy thread on most transports), so the
// last block out of `counter` adds the whole grid's share at once instead: one signal per peer, not per block.
// Lost ranks (the fault-tolerant mode) hear nothing.
template <class Transport>
__device__ __forceinline__ void announce_block_arrival(const RankContext& c, const Transport& transport,
                                                       SymmetricRef<uint64_t> signal, uint32_t payload,
                                                       PhaseCounter counter) {
  if (transport.load_store_only()) {
    __syncthreads();
    const uint64_t share = ArrivalSignal::share(blockIdx.x, gridDim.x, payload);
    for (uint32_t peer = threadIdx.x; peer < c.layout.world_size; peer += blockDim.x) {
      if (!is_lost(transport, c, peer)) transport.signal_add(int(peer), signal, share);
    }
    return;
  }
  if (!last_block_out(c.phase_counter(counter))) return;
  const uint64_t whole_grid = ArrivalSignal::share(0, 1, payload);
  for (uint32_t peer = threadIdx.x; peer < c.layout.world_size; peer += blockDim.x) {
    if (!is_lost(transport, c, peer)) transport.signal_add(int(peer), signal, whole_grid);
  }
  reset_phase_counter(c, counter);
}

}  // namespace expertwire::device
