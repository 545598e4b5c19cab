// The high-throughput dispatch's first half, the count exchange, in three kernels:
//   route    one thread per token: validates its experts, and numbers its slots within its route block: for the
//            first slot naming each destination rank, the token's place among the block's tokens for that rank;
//            for every slot, its place among the block's tokens of that expert. Per-block counts to the handle.
//   publish  adds the earlier blocks' counts (the places become rows among all of this rank's tokens), writes the
//            token records, stages the rows for peers that pull them, and has its last block out send every rank
//            its count row and +1 on count_arrived.
//   offsets  one block: waits for every rank's count row (a lost rank's counts as empty in the fault-tolerant
//            mode) and derives where every row goes (the handle's recv_base, base_at, send_base, home_base,
//            segments, expert_prefix), and the host's counts; in the fault-tolerant mode it then tells each
//            sender where its rows start here (RecvBase), which the sender's data kernel takes as its base_at.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "device/ht_args.h"
#include "device/liveness.cuh"
#include "device/primitives.cuh"

namespace expertwire::device {

inline constexpr uint32_t kRouteWarps = kRouteBlockTokens / kWarpSize;

// Shared memory of the route kernel: per-warp counters of every rank and expert, and every token's experts,
// in-warp places and weights.
__host__ __device__ inline uint64_t route_shared_bytes(const HtLayout& l) {
  return (uint64_t(kRouteWarps) * (l.world_size + l.num_experts) + 4ull * kRouteBlockTokens * l.experts_per_token) *
         sizeof(uint32_t);
}

// The three 32-bit arrays after the rank rows in a token record: expert rows, experts, weights.
__device__ __forceinline__ int32_t* record_words(uint8_t* record, uint32_t k, uint32_t field) {
  return reinterpret_cast<int32_t*>(record) + field * k;
}
enum RecordField : uint32_t { kRecordRankRow = 0, kRecordExpertRow = 1, kRecordExpert = 2, kRecordWeight = 3 };

// One thread per token (kRouteBlockTokens a block, route_shared_bytes of dynamic shared memory); ht_route.cu.
__global__ void ht_route_kernel(HtArgs a);

template <class Transport>
__global__ void __launch_bounds__(kMaxBlockThreads, kMinBlocksPerSm) ht_publish_kernel(HtArgs a, Transport transport) {
  const HtLayout& l = a.l;
  const uint32_t k = l.experts_per_token, counters = l.world_size + l.num_experts;
  const uint32_t route_blocks = (a.m + kRouteBlockTokens - 1) / kRouteBlockTokens;
  extern __shared__ uint32_t block_base[];  // [counters]

  for (uint32_t b = blockIdx.x; b < route_blocks; b += gridDim.x) {
    __syncthreads();
    for (uint32_t c = threadIdx.x; c < counters; c += blockDim.x) {
      uint32_t sum = 0;
      for (uint32_t earlier = 0; earlier < b; ++earlier) sum += a.h.block_counts[uint64_t(earlier) * counters + c];
      block_base[c] = sum;
    }
    __syncthreads();
    // Slots in batches whose loads all issue before any store (the compiler may not move a load past a store to
    // memory it cannot tell apart).
    constexpr uint32_t kBatch = 4;
    for (uint32_t i0 = threadIdx.x; i0 < kRouteBlockTokens * k; i0 += kBatch * blockDim.x) {
      int32_t e[kBatch], rank_row[kBatch], expert_row[kBatch];
#pragma unroll
      for (uint32_t u = 0; u < kBatch; ++u) {
        const uint32_t i = i0 + u * blockDim.x, t = b * kRouteBlockTokens + i / k;
        if (i >= kRouteBlockTokens * k || t >= a.m) continue;
        e[u] = record_words(a.local<uint8_t>(l.token_record_offset(t)), k, kRecordExpert)[i % k];
        rank_row[u] = a.h.slot_rank_row[uint64_t(t) * k + i % k];
        expert_row[u] = a.h.slot_expert_row[uint64_t(t) * k + i % k];
      }
#pragma unroll
      for (uint32_t u = 0; u < kBatch; ++u) {
        const uint32_t i = i0 + u * blockDim.x, t = b * kRouteBlockTokens + i / k, j = i % k;
        if (i >= kRouteBlockTokens * k || t >= a.m) continue;
        if (rank_row[u] >= 0) rank_row[u] += int32_t(block_base[uint32_t(e[u]) / l.num_local_experts]);
        if (expert_row[u] >= 0) expert_row[u] += int32_t(block_base[l.world_size + uint32_t(e[u])]);
        a.h.slot_rank_row[uint64_t(t) * k + j] = rank_row[u];
        a.h.slot_expert_row[uint64_t(t) * k + j] = expert_row[u];
        uint8_t* record = a.local<uint8_t>(l.token_record_offset(t));
        record_words(record, k, kRecordRankRow)[j] = rank_row[u];
        record_words(record, k, kRecordExpertRow)[j] = expert_row[u];
      }
    }
  }

  // Stage the rows that peers read (and that puts send from: a put needs a registered source).
  for (uint32_t t = global_warp(); t < a.m; t += total_warps()) {
    uint8_t* row = a.local<uint8_t>(l.input_row_offset(t));
    if (!a.x_staged) warp_copy_16<SourceKind::kInput>(row, a.x.at(t, 0), a.x_bytes);
    if (l.hidden_dim_scale_bytes != 0 && !a.scale_staged) {
      warp_copy_4_strided_to_lanes(reinterpret_cast<const uint8_t*>(a.x_scale.at(t, 0)), a.x_scale.element_stride,
                                   l.hidden_dim_scale_bytes / 4, 1u, 4, [&](int) { return row + l.scale_offset; });
    }
  }

  if (!last_block_out(&a.workspace->phase[kHtPublished])) return;
  if (threadIdx.x == 0) a.workspace->phase[kHtPublished] = 0;
  if constexpr (Transport::kFaultTolerant) {
    if (!still_serving(a, Phase::kDispatchSend)) return;
  }
  // This rank's totals: tokens to each rank, tokens of each expert, and m; one row per destination.
  for (uint32_t i = threadIdx.x; i < l.world_size * l.count_row_words; i += blockDim.x) {
    const uint32_t dest = i / l.count_row_words, word = i % l.count_row_words;
    uint32_t column = ~0u, value = 0;
    if (word < l.world_size) column = word;
    else if (word < l.world_size + l.num_local_experts)
      column = l.world_size + dest * l.num_local_experts + (word - l.world_size);
    else if (word == l.count_word_m()) value = a.m;
    else if (word == l.count_word_x_bytes()) value = a.x_bytes;
    if (column != ~0u) {
      for (uint32_t b = 0; b < route_blocks; ++b) value += __ldcg(&a.h.block_counts[uint64_t(b) * counters + column]);
    }
    a.local<uint32_t>(l.count_out_row_offset(dest))[word] = value;
  }
  __syncthreads();
  const uint64_t row_bytes = uint64_t(l.count_row_words) * 4;
  bool issued_puts = false;
  for (uint32_t dest = warp_id(); dest < l.world_size; dest += warps_per_block()) {
    if (is_lost(transport, a, dest)) continue;
    const uint8_t* row = a.local<uint8_t>(l.count_out_row_offset(dest));
    const SymmetricRef<uint8_t> there{l.count_row_offset(l.rank)};
    if (uint8_t* direct = transport.peer(int(dest), there)) {
      for (uint32_t w = lane_id(); w < l.count_row_words; w += kWarpSize) {
        reinterpret_cast<uint32_t*>(direct)[w] = reinterpret_cast<const uint32_t*>(row)[w];
      }
    } else if constexpr (Transport::kMayPut) {
      transport.put_warp(int(dest), there, row, row_bytes);
      issued_puts = true;
    }
  }
  transport.flush_warp(issued_puts);
  __syncthreads();
  for (uint32_t dest = threadIdx.x; dest < l.world_size; dest += blockDim.x) {
    if (is_lost(transport, a, dest)) continue;
    transport.signal_add(int(dest), SymmetricRef<uint64_t>{l.count_arrived_offset + uint64_t(l.rank) * 8}, 1);
  }
}

// Shared memory of the offsets kernel: every rank's count row and the tokens of each local expert.
__host__ __device__ inline uint64_t offsets_shared_bytes(const HtLayout& l) {
  return (uint64_t(l.world_size) * l.count_row_words + l.num_local_experts) * sizeof(uint32_t);
}

// One block of kMaxBlockThreads (offsets_shared_bytes of dynamic shared memory). Waits for every rank's count row
// of this dispatch, then fills the handle's offsets.
template <class Transport>
__global__ void __launch_bounds__(kMaxBlockThreads) ht_offsets_kernel(HtArgs a, Transport transport) {
  const HtLayout& l = a.l;
  const uint32_t W = l.world_size, L = l.num_local_experts, words = l.count_row_words;
  // Every rank's count row (zero when the wait gave up, or for a lost rank), then the tokens of each local expert:
  // read once from global memory, all at once, so the loops below run on shared memory.
  extern __shared__ uint32_t offsets_shared[];
  uint32_t* count_rows = offsets_shared;                     // [W][words]
  uint32_t* tokens_per_expert = offsets_shared + W * words;  // [L]
  const uint64_t target = a.workspace->dispatch_calls + 1;
  bool missing = false;
  for (uint32_t s = threadIdx.x; s < W; s += blockDim.x) {
    missing |= wait_for_peer(
                   a, transport, a.local<uint64_t>(l.count_arrived_offset + uint64_t(s) * 8),
                   [&](uint64_t v) { return v >= target; }, Phase::kDispatchRecv, s) < target;
  }
  // Each wait's own verdict: the error record keeps only the first error, which may be bad input.
  bool gave_up = __syncthreads_or(missing);
  if constexpr (Transport::kFaultTolerant) {
    // A wait that gave up lost its rank, not the exchange: a lost rank's row counts as empty. Ranks whose masks
    // differ for this call still place every row alike: each receiver tells its senders where their rows start
    // (RecvBase, below). Only this rank being masked out fails the exchange, and then it sends nothing more
    // (stopped: one verdict for the data kernel's and the combine's grids).
    gave_up = __syncthreads_or(threadIdx.x == 0 && masked_out(a.error));
    for (uint32_t s = threadIdx.x; s < W; s += blockDim.x) a.workspace->data_settled[s] = kHtDataUnsettled;
    if (threadIdx.x == 0) a.workspace->stopped = gave_up ? 1u : 0u;
  }
  const uint32_t* arrived = a.local<uint32_t>(l.count_row_offset(0));
  for (uint32_t i = threadIdx.x; i < W * words; i += blockDim.x) {
    count_rows[i] = gave_up || is_lost(transport, a, i / words) ? 0u : __ldcg(arrived + i);
  }
  __syncthreads();
  auto count = [&](uint32_t source, uint32_t word) { return count_rows[source * words + word]; };
  bool mismatch = false;
  // Per source s: its rows here start at recv_base[s]; where our rows for s land in its combine_recv.
  for (uint32_t s = threadIdx.x; s < W; s += blockDim.x) {
    uint32_t home = 0, at = 0;
    for (uint32_t r = 0; r < l.rank; ++r) home += count(s, r);
    for (uint32_t earlier = 0; earlier < l.rank; ++earlier) at += count(earlier, s);
    a.h.home_base[s] = home;
    a.h.base_at[s] = at;
    a.h.source_m[s] = count(s, l.count_word_m());
    // Rows are copied at our payload size: a source that sends another one is refused, and nothing is received.
    const uint32_t source_bytes = count(s, l.count_word_x_bytes());
    if (!gave_up && !is_lost(transport, a, s) && source_bytes != a.x_bytes) {
      record_error(a.error, ErrorCode::kPayloadMismatch, Phase::kDispatchRecv, int32_t(s), source_bytes);
      mismatch = true;
    }
  }
  for (uint32_t e = threadIdx.x; e < L; e += blockDim.x) {
    uint32_t running = 0;
    for (uint32_t s = 0; s < W; ++s) {
      a.h.expert_prefix[s * L + e] = running;
      running += count(s, W + e);
    }
    tokens_per_expert[e] = running;
    a.h.tokens_per_expert[e] = running;
    a.h.host_counts[2 + e] = running;
  }
  // The data kernel's verdict, whatever error the record kept first.
  const bool failed = __syncthreads_or(mismatch) || gave_up;
  if (threadIdx.x == 0) {
    a.workspace->exchange_failed = failed ? 1u : 0u;
    uint32_t running = 0;
    for (uint32_t s = 0; s < W; ++s) {
      a.h.recv_base[s] = running;
      running += count(s, l.rank);
    }
    a.h.recv_base[W] = running;
    uint32_t sent = 0;
    for (uint32_t r = 0; r < W; ++r) {
      a.h.send_base[r] = sent;
      sent += count(l.rank, r);
    }
    a.h.send_base[W] = sent;
    uint64_t rows = 0;
    for (uint32_t e = 0; e < L; ++e) {
      a.h.segment_start[e] = uint32_t(rows);
      rows += align_up(tokens_per_expert[e], l.expert_alignment);
    }
    a.h.segment_start[L] = uint32_t(rows);
    if (running > l.recv_rows) {
      record_error(a.error, ErrorCode::kCapacityExceeded, Phase::kDispatchRecv, -1, running);
    }
    a.h.host_counts[0] = running;
    a.h.host_counts[1] = uint32_t(rows);
    a.workspace->dispatch_calls = target;
  }
  if constexpr (Transport::kFaultTolerant) {
    __syncthreads();
    for (uint32_t s = threadIdx.x; s < W && !gave_up; s += blockDim.x) {
      if (is_lost(transport, a, s)) continue;
      transport.signal(int(s), SymmetricRef<uint64_t>{l.recv_base_offset(l.rank)},
                       RecvBase::encode(target, a.h.recv_base[s]));
    }
  }
}

}  // namespace expertwire::device
