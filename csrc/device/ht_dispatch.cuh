// The high-throughput dispatch's second half: the rows move. Pull (every peer load/store reachable): each
// receiver reads every sender's token records and copies the tokens that name its experts straight from the
// sender's input rows into its outputs. Push: each sender puts each token once into the staging rows of every rank
// it names, then +1 on data_arrived; receivers copy from their staging rows. Either way a token crosses to a rank
// once; the expert-contiguous layout's copies for several local experts are written by the receiver.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "device/ht_args.h"
#include "device/ht_route.cuh"
#include "device/liveness.cuh"
#include "device/primitives.cuh"

namespace expertwire::device {

// Rows the outputs need in the chosen layout.
__device__ __forceinline__ uint32_t ht_rows_needed(const HtArgs& a) {
  return a.out.layout == HighThroughputLayout::kRankPacked ? a.h.recv_base[a.l.world_size]
                                                           : a.h.segment_start[a.l.num_local_experts];
}

// Lane j's slot (j < k) of a token record: its expert, the token's row at that expert's rank (first slot of each
// rank), its row among the expert's tokens, its weight; -1 and 0 on other lanes.
struct SlotRoute {
  int32_t e = -1, rank_row = -1, expert_row = -1;
  float w = 0.0f;
};

__device__ __forceinline__ SlotRoute load_slot_route(const uint8_t* record, uint32_t k) {
  const auto* words = reinterpret_cast<const int32_t*>(record);
  SlotRoute route;
  const uint32_t lane = uint32_t(lane_id());
  if (lane < k) {
    route.e = __ldcg(words + kRecordExpert * k + lane);
    route.rank_row = __ldcg(words + kRecordRankRow * k + lane);
    route.expert_row = __ldcg(words + kRecordExpertRow * k + lane);
    route.w = __int_as_float(__ldcg(words + kRecordWeight * k + lane));
  }
  return route;
}

// Writes a received token (its `route` and `row`: a sender's, or our staging copy) into the outputs; `packed_row`
// is its rank-packed row, or ~0u to read it from the route. Whole warp.
__device__ __forceinline__ void ht_receive_token(const HtArgs& a, uint32_t source, const SlotRoute& route,
                                                 const uint8_t* row, uint32_t packed_row) {
  const HtLayout& l = a.l;
  const uint32_t k = l.experts_per_token, L = l.num_local_experts;
  const int lane = lane_id();
  const int32_t e = route.e, rank_row = route.rank_row, expert_row = route.expert_row;
  const float w = route.w;
  const bool on_me = e >= 0 && uint32_t(e) / L == l.rank;
  const unsigned local = __ballot_sync(kFullMask, on_me);
  if (local == 0) return;
  if (packed_row == ~0u) {
    const unsigned first = __ballot_sync(kFullMask, on_me && rank_row >= 0);
    packed_row = a.h.recv_base[source] + uint32_t(__shfl_sync(kFullMask, rank_row, __ffs(first) - 1));
  }
  const uint32_t le = on_me ? uint32_t(e) - l.rank * L : 0;
  const uint64_t x_bytes = a.x_bytes, scale_words = l.hidden_dim_scale_bytes / 4;
  const uint8_t* scales = row + l.scale_offset;
  if (a.out.layout == HighThroughputLayout::kRankPacked) {
    warp_copy_16<SourceKind::kPeerWritten>(a.out.recv_x + packed_row * x_bytes, row, x_bytes);
    if (scale_words != 0) {
      warp_copy_4_strided_to_lanes(scales, 4, scale_words, 1u, a.out.recv_x_scale.element_stride, [&](int) {
        return reinterpret_cast<uint8_t*>(a.out.recv_x_scale.at(packed_row, 0));
      });
    }
    if (uint32_t(lane) < k) {
      a.out.recv_topk_idx[uint64_t(packed_row) * k + lane] = on_me ? int64_t(le) : -1;
      a.out.recv_topk_weights[uint64_t(packed_row) * k + lane] = on_me ? w : 0.0f;
    }
    return;
  }
  const uint32_t out_row =
      on_me ? a.h.segment_start[le] + a.h.expert_prefix[source * L + le] + uint32_t(expert_row) : 0;
  auto row_of = [&](int from) { return __shfl_sync(kFullMask, out_row, from); };
  warp_copy_16_to_lanes<SourceKind::kPeerWritten>(row, x_bytes, local,
                                                  [&](int from) { return a.out.recv_x + row_of(from) * x_bytes; });
  if (scale_words != 0) {
    warp_copy_4_strided_to_lanes(scales, 4, scale_words, local, a.out.recv_x_scale.element_stride, [&](int from) {
      return reinterpret_cast<uint8_t*>(a.out.recv_x_scale.at(row_of(from), 0));
    });
  }
  if (on_me) {
    a.out.row_expert[out_row] = int32_t(le);
    a.out.row_weight[out_row] = w;
  }
  if (uint32_t(lane) < k) {
    a.h.recv_slot_row[uint64_t(packed_row) * k + lane] = on_me ? int32_t(out_row) : -1;
    a.h.recv_slot_weight[uint64_t(packed_row) * k + lane] = on_me ? w : 0.0f;
  }
}

// Push: every token of this rank to the staging rows of every rank it names, once each; then data_arrived (not
// once the others have masked this rank out: !serving). Lost ranks get nothing.
template <class Transport>
__device__ __forceinline__ void ht_push_tokens(const HtArgs& a, const Transport& transport, bool send_rows,
                                               bool serving) {
  const HtLayout& l = a.l;
  const uint32_t k = l.experts_per_token;
  const int lane = lane_id();
  // Without the count exchange there are no offsets to put by; the signals still go out, peers wait for them.
  bool issued_puts = false;
  for (uint32_t t = global_warp(); send_rows && t < a.m; t += total_warps()) {
    int32_t rank_row = -1, dest = -1;
    if (uint32_t(lane) < k) {
      rank_row = a.h.slot_rank_row[uint64_t(t) * k + lane];
      dest = a.h.slot_dest[uint64_t(t) * k + lane];
    }
    const uint8_t* record = a.local<uint8_t>(l.token_record_offset(t));
    const uint8_t* row = a.local<uint8_t>(l.input_row_offset(t));
    for (unsigned sends = __ballot_sync(kFullMask, rank_row >= 0); sends != 0; sends &= sends - 1) {
      const int from = __ffs(sends) - 1;
      const int r = __shfl_sync(kFullMask, dest, from);
      const uint32_t at = a.h.base_at[r] + uint32_t(__shfl_sync(kFullMask, rank_row, from));
      if (at >= l.recv_rows || is_lost(transport, a, uint32_t(r))) continue;  // the receiver reports its overflow
      auto send = [&](uint64_t offset, const uint8_t* src, uint64_t bytes) {
        const SymmetricRef<uint8_t> there{offset};
        if (uint8_t* direct = transport.peer(r, there)) {
          warp_copy_16<SourceKind::kInput>(direct, src, bytes);
        } else if constexpr (Transport::kMayPut) {
          transport.put_warp(r, there, src, bytes);
          issued_puts = true;
        }
      };
      send(l.staging_record_offset(at), record, l.record_bytes);
      send(l.staging_row_offset(at), row, a.x_bytes);
      if (l.hidden_dim_scale_bytes != 0) {
        send(l.staging_row_offset(at) + l.scale_offset, row + l.scale_offset, align_up(l.hidden_dim_scale_bytes, 16));
      }
    }
  }
  transport.flush_warp(issued_puts);
  if (!last_block_out(&a.workspace->phase[kHtPushed])) return;
  if (threadIdx.x == 0) a.workspace->phase[kHtPushed] = a.workspace->push_verdict = 0;
  if (!serving) return;
  for (uint32_t r = threadIdx.x; r < l.world_size; r += blockDim.x) {
    if (is_lost(transport, a, r)) continue;
    transport.signal_add(int(r), SymmetricRef<uint64_t>{l.data_arrived_offset + uint64_t(l.rank) * 8}, 1);
  }
}

// The fault-tolerant push receive's verdict on sender `source`'s rows, the same in every block (data_settled,
// settle_once): the first block to settle it takes what its wait found (or a signal that came just as the wait
// gave up), unless the sender was lost before the block looked; a block that finds the rows settled as arrived
// acquires them too.
__device__ inline bool settle_data(const HtArgs& a, uint32_t source, bool arrived, bool lost_before, uint64_t target) {
  const uint64_t* signal = a.local<uint64_t>(a.l.data_arrived_offset + uint64_t(source) * 8);
  if (!arrived && !lost_before) arrived = load_acquire_sys(signal) >= target;
  const uint32_t settled = settle_once(&a.workspace->data_settled[source], arrived ? kHtDataArrived : kHtDataLost);
  if (settled == kHtDataArrived && !arrived) load_acquire_sys(signal);
  return settled == kHtDataArrived;
}

// Whether a sender's rows were settled as lost (the fault-tolerant push receive), as every block reads it.
__device__ __forceinline__ bool ht_rows_lost(const HtArgs& a, uint32_t source) {
  return *reinterpret_cast<const volatile uint32_t*>(&a.workspace->data_settled[source]) == kHtDataLost;
}

// A received token whose rows never came (its sender was lost after the count exchange): its rank-packed row
// names no expert. Whole warp.
__device__ __forceinline__ void ht_receive_nothing(const HtArgs& a, uint32_t packed_row) {
  const uint32_t k = a.l.experts_per_token, lane = uint32_t(lane_id());
  if (lane >= k) return;
  if (a.out.layout == HighThroughputLayout::kRankPacked) {
    a.out.recv_topk_idx[uint64_t(packed_row) * k + lane] = -1;
    a.out.recv_topk_weights[uint64_t(packed_row) * k + lane] = 0.0f;
  } else {
    a.h.recv_slot_row[uint64_t(packed_row) * k + lane] = -1;
    a.h.recv_slot_weight[uint64_t(packed_row) * k + lane] = 0.0f;
  }
}

// The sender of row `r` of local expert e's expert-contiguous segment (r < its tokens): the last source whose
// prefix of that expert's rows is <= r.
__device__ __forceinline__ uint32_t ht_expert_row_source(const HtArgs& a, uint32_t e, uint32_t r) {
  const uint32_t L = a.l.num_local_experts;
  uint32_t source = 0;
  for (uint32_t s = 1; s < a.l.world_size; ++s) {
    if (a.h.expert_prefix[s * L + e] <= r) source = s;
  }
  return source;
}

template <class Transport>
__global__ void __launch_bounds__(kMaxBlockThreads, kMinBlocksPerSm) ht_data_kernel(HtArgs a, Transport transport) {
  const HtLayout& l = a.l;
  const uint32_t W = l.world_size, L = l.num_local_experts;
  const bool pull = transport.load_store_only();
  const uint32_t num_recv = a.h.recv_base[W];
  const uint32_t rows_needed = ht_rows_needed(a);
  // A rank whose count exchange gave up has no offsets to write by, one whose sources disagree on the payload size
  // no rows to copy at its own; one over capacity writes no row.
  __shared__ bool exchange_failed;
  if (threadIdx.x == 0) exchange_failed = a.workspace->exchange_failed != 0;
  __syncthreads();
  bool receive = !exchange_failed && num_recv <= l.recv_rows && rows_needed <= a.out.capacity_rows;
  if (blockIdx.x == 0 && threadIdx.x == 0 && rows_needed > a.out.capacity_rows) {
    record_error(a.error, ErrorCode::kCapacityExceeded, Phase::kDispatchRecv, -1, rows_needed);
  }
  if (blockIdx.x == 0) {
    for (uint32_t e = threadIdx.x; e <= L; e += blockDim.x) {
      if (e < L && a.out.tokens_per_expert != nullptr) a.out.tokens_per_expert[e] = int32_t(a.h.tokens_per_expert[e]);
      if (a.out.expert_offsets != nullptr) a.out.expert_offsets[e] = int32_t(a.h.segment_start[e]);
    }
    if (threadIdx.x == 0 && a.out.num_recv_rows != nullptr) *a.out.num_recv_rows = int32_t(rows_needed);
  }

  if constexpr (Transport::kFaultTolerant) {
    // Where this rank's rows start at each receiver, as the receiver derived it (RecvBase): the push puts by it and
    // the pull combine reads by it (the handle keeps it). Every pushing block writes the same values; a pull
    // dispatch leaves it to block 0, for the combine.
    const uint64_t dispatch = a.workspace->dispatch_calls;
    const bool needs_bases = !exchange_failed && (!pull || blockIdx.x == 0);
    for (uint32_t r = threadIdx.x; r < W && needs_bases; r += blockDim.x) {
      const uint64_t base = wait_for_peer(
          a, transport, a.local<uint64_t>(l.recv_base_offset(r)),
          [&](uint64_t value) { return RecvBase::of(value, dispatch); }, Phase::kDispatchSend, r);
      if (base != 0) a.h.base_at[r] = RecvBase::first_row(base);
    }
    __syncthreads();
  }
  if constexpr (Transport::kMayPut) {
    if (!pull) {
      bool serving = true;
      if constexpr (Transport::kFaultTolerant) {
        serving = still_serving_grid(a, &a.workspace->push_verdict, a.workspace->stopped != 0, Phase::kDispatchSend);
      }
      ht_push_tokens(a, transport, !exchange_failed && serving, serving);
      const uint64_t target = a.workspace->dispatch_calls;  // advanced by this dispatch's offsets kernel
      bool missing = false;
      for (uint32_t s = threadIdx.x; s < W; s += blockDim.x) {
        const bool lost_before = is_lost(transport, a, s);
        bool arrived = wait_for_peer(
                           a, transport, a.local<uint64_t>(l.data_arrived_offset + uint64_t(s) * 8),
                           [&](uint64_t v) { return v >= target; }, Phase::kDispatchRecv, s) >= target;
        if constexpr (Transport::kFaultTolerant) arrived = settle_data(a, s, arrived, lost_before, target);
        missing |= !arrived;
      }
      // In the fault-tolerant mode a lost sender's rows are left out (ht_receive_nothing), not the others'.
      const bool any_missing = __syncthreads_or(missing);
      if constexpr (!Transport::kFaultTolerant) receive = !any_missing && receive;
      if (receive) {
        for (uint32_t i = global_warp(); i < num_recv; i += total_warps()) {
          const uint32_t source = find_segment(a.h.recv_base, W, i);
          if (Transport::kFaultTolerant && ht_rows_lost(a, source)) {
            ht_receive_nothing(a, i);
            continue;
          }
          ht_receive_token(a, source,
                           load_slot_route(a.local<uint8_t>(l.staging_record_offset(i)), l.experts_per_token),
                           a.local<uint8_t>(l.staging_row_offset(i)), i);
        }
      }
    }
  }
  if (pull && receive) {
    __shared__ uint32_t source_first[kMaxHighThroughputRanks + 1];
    if (threadIdx.x == 0) {
      uint32_t running = 0;
      for (uint32_t s = 0; s < W; ++s) {
        source_first[s] = running;
        running += a.h.source_m[s];
      }
      source_first[W] = running;
    }
    __syncthreads();
    // Item = (source, token). The next item's record loads while this one's row is copied.
    const uint32_t items = source_first[W];
    auto route_of = [&](uint32_t item) {
      const uint32_t s = find_segment(source_first, W, item);
      return load_slot_route(
          transport.peer(int(s), SymmetricRef<uint8_t>{l.token_record_offset(item - source_first[s])}),
          l.experts_per_token);
    };
    SlotRoute next;
    if (global_warp() < items) next = route_of(global_warp());
    for (uint32_t item = global_warp(); item < items; item += total_warps()) {
      const SlotRoute route = next;
      if (item + total_warps() < items) next = route_of(item + total_warps());
      const uint32_t s = find_segment(source_first, W, item), t = item - source_first[s];
      ht_receive_token(a, s, route, transport.peer(int(s), SymmetricRef<uint8_t>{l.input_row_offset(t)}), ~0u);
    }
  }
  // Padding rows between expert-contiguous segments, and (the fault-tolerant push receive) the rows of senders lost
  // after the count exchange, which never came.
  if (receive && a.out.layout == HighThroughputLayout::kExpertContiguous) {
    for (uint32_t r = blockIdx.x * blockDim.x + threadIdx.x; r < rows_needed; r += gridDim.x * blockDim.x) {
      const uint32_t e = find_segment(a.h.segment_start, L, r), in_segment = r - a.h.segment_start[e];
      bool empty = in_segment >= a.h.tokens_per_expert[e];
      if constexpr (Transport::kFaultTolerant) {
        empty = empty || (!pull && ht_rows_lost(a, ht_expert_row_source(a, e, in_segment)));
      }
      if (empty) {
        a.out.row_expert[r] = -1;
        a.out.row_weight[r] = 0.0f;
      }
    }
  }
}

}  // namespace expertwire::device
