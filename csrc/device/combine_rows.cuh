// What both combine forms share: pushing expert rows back to their tokens' ranks, and waiting for every rank's
// rows to be where the reduction reads them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "device/delivery.cuh"
#include "device/kernel_args.h"
#include "device/liveness.cuh"
#include "device/primitives.cuh"
#include "device/vec8.cuh"

namespace expertwire::device {

// Where the rows the last dispatch delivered start: expert_start[le] is the first of local expert le's rows in
// one running count over all experts, expert_start[num_local_experts] their total (in shared memory, laid out
// as CombineShared says). Call with the whole block.
__device__ inline const uint32_t* received_row_starts(const RankContext& c) {
  const uint32_t num_local = c.layout.num_local_experts;
  extern __shared__ uint32_t shared[];
  uint32_t* expert_total = shared + CombineShared::expert_total_word();
  uint32_t* expert_start = shared + CombineShared::expert_start_word(c.layout);
  const int32_t* recv_counts = c.recv_counts();
  for (uint32_t le = threadIdx.x; le < num_local; le += blockDim.x) expert_total[le] = uint32_t(recv_counts[le]);
  __syncthreads();
  if (warp_id() == 0) warp_exclusive_scan(expert_total, expert_start, num_local);
  __syncthreads();
  return expert_start;
}

// Whether expert_y is this rank's expert_outputs region (AllToAll::expert_output_buffer), which peers can read.
__device__ __forceinline__ bool expert_y_in_buffer(const CombineArgs& a) {
  return a.expert_y == a.ctx.expert_outputs();
}

// Writes each row i of expert_y[le] (SourceT: ExpertT, or float32 to send as ExpertT) to row (token, k) of
// combine_recv of every rank of its source group but lost ones, a row per warp, and flushes the puts. Call with
// the whole block.
template <class ExpertT, class SourceT, class Transport>
__device__ void push_rows_to_sources(const CombineArgs& a, const Transport& transport) {
  const RankContext& c = a.ctx;
  const BufferLayout& l = c.layout;
  const uint32_t num_local = l.num_local_experts;
  const uint32_t* expert_start = received_row_starts(c);

  const TokenRoute* routes = c.routes();
  uint8_t* staging = c.local(c.staging_row(global_warp()));
  // Rows the experts wrote into expert_outputs are in the symmetric buffer already: puts send them from there,
  // without a staging copy.
  constexpr bool kConverts = !std::is_same_v<SourceT, ExpertT>;  // float32 rows (never in expert_outputs)
  const bool y_is_symmetric = !kConverts && expert_y_in_buffer(a);
  const uint32_t total = expert_start[num_local];
  bool issued_puts = false;
  for (uint32_t j = global_warp(); j < total; j += total_warps()) {
    const uint32_t le = find_segment(expert_start, num_local, j);
    const uint64_t row = uint64_t(le) * l.max_recv_tokens + (j - expert_start[le]);
    const TokenRoute route = routes[row];
    const uint8_t* y = a.expert_y + row * (kConverts ? uint64_t(l.hidden_dim) * sizeof(float) : l.combine_row_bytes);
    const SymmetricRef<uint8_t> dst = c.combine_row(route.token, route.k);
    bool staged = y_is_symmetric;
    uint8_t* put_source = y_is_symmetric ? const_cast<uint8_t*>(y) : staging;  // written only when !staged
    for (uint32_t d = 0; d < l.dp_size; ++d) {
      const int peer = int(route.source_group * l.dp_size + d);
      if (is_lost(transport, c, uint32_t(peer))) continue;
      issued_puts |= deliver_row(transport, peer, dst, l.combine_row_bytes, put_source, staged, [&](uint8_t* address) {
        if constexpr (kConverts) {
          warp_copy_floats_as<ExpertT>(address, reinterpret_cast<const float*>(y), l.hidden_dim);
        } else {
          warp_copy_16<SourceKind::kInput>(address, y, l.combine_row_bytes);
        }
      });
    }
  }
  transport.flush_warp(issued_puts);
}

// Adds this block's arrival to every rank's combine_done: its rows are `at` (block 0 says so), as RowT.
template <class RowT, class Transport>
__device__ __forceinline__ void announce_combine_rows(const CombineArgs& a, const Transport& transport,
                                                      CombineRowsAt at) {
  announce_block_arrival(a.ctx, transport, a.ctx.combine_done(a.ctx.rank),
                         CombineArrival::payload(at, row_type_of<RowT>()), kCombineSendDone);
}

// Waits until every rank has announced its combine rows (they are where this rank's reduction reads them).
// With `pushed_bits` (shared memory, a bit per rank) also notes which ranks pushed them (CombineRowsAt). Returns
// whether every rank's rows travel as `row_type`, the type this rank sums; else the error is recorded (the
// first other rank the block saw) and the caller writes nothing. In the fault-tolerant mode the ranks then
// agree on the lost ones, whose rows the reduction leaves out. Call with the whole block.
template <class Transport>
__device__ bool wait_combine_done(const RankContext& c, const Transport& transport, ScalarType row_type,
                                  uint32_t* pushed_bits = nullptr) {
  const uint32_t world = c.layout.world_size;
  if (pushed_bits != nullptr) {
    for (uint32_t w = threadIdx.x; w < CombineShared::rank_bit_words(c.layout); w += blockDim.x) pushed_bits[w] = 0;
    __syncthreads();
  }
  bool mismatch = false;
  for (uint32_t peer = threadIdx.x; peer < world; peer += blockDim.x) {
    const uint64_t arrival =
        wait_for_peer(c, transport, c.local(c.combine_done(peer)), ArrivalSignal::complete, Phase::kCombineRecv, peer);
    if (arrival == 0) continue;  // given up on
    const uint32_t payload = ArrivalSignal::payload(arrival);
    if (CombineArrival::row_type(payload) != row_type) {
      record_error(c.error, ErrorCode::kRowTypeMismatch, Phase::kCombineRecv, int32_t(peer),
                   RowTypeMismatch::value(CombineArrival::row_type(payload), row_type));
      mismatch = true;
    }
    if (pushed_bits != nullptr && CombineArrival::rows_at(payload) == kRowsPushed) {
      atomicOr(&pushed_bits[peer / 32], 1u << (peer % 32));
    }
  }
  const bool matched = __syncthreads_or(mismatch) == 0;
  if constexpr (Transport::kFaultTolerant) {
    agree_on_losses(c, transport, c.phase_counter(kCombineWaitsDone), Phase::kCombineRecv);
  }
  return matched;
}

}  // namespace expertwire::device
