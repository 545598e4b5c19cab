// The high-throughput combine, one kernel in two halves.
//   send     (expert side) one rank-packed row per received token into combine_rows: the caller's row as it is
//            (rank-packed), or the sum of the token's expert-contiguous rows times their weights (fp32, k order,
//            rounded to the row type); push: put straight on to the token's rank, at its combine_recv row; then +1
//            on every rank's combine_ready.
//   receive  (token side) out[t] = the sum, in rank order and fp32, of token t's rows from every rank it went to:
//            read from the expert rank's combine_rows (pull) or from our combine_recv (push).
// With per-slot values (topk_weights) each row has a slot row beside it, combine_weights / combine_recv_weights,
// and the receiver takes slot j's value from the rank that holds slot j's expert.
// In the fault-tolerant mode the receive agrees on the lost ranks after its waits and leaves their rows out.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "device/ht_args.h"
#include "device/liveness.cuh"
#include "device/primitives.cuh"
#include "device/vec8.cuh"

namespace expertwire::device {

// Eight elements of a row of T as they are stored: one 16-byte vector of a 16-bit type, two of float.
template <class T>
struct EightOf {
  int4 words[sizeof(T) / 2];
};

// Vector v (elements 8v..8v+7) of a row of T. kCoherent: rows peers write (bypass L1).
template <class T, bool kCoherent>
__device__ __forceinline__ EightOf<T> load_eight(const T* row, uint32_t v) {
  EightOf<T> eight;
  const auto* p = reinterpret_cast<const int4*>(row) + uint64_t(v) * (sizeof(T) / 2);
#pragma unroll
  for (uint32_t i = 0; i < sizeof(T) / 2; ++i) eight.words[i] = kCoherent ? __ldcg(p + i) : load_stream(p + i);
  return eight;
}

// acc += weight * eight, element by element, in fp32.
template <class T>
__device__ __forceinline__ void accumulate_eight(const EightOf<T>& eight, float weight, float* acc) {
  float y[8];
  if constexpr (std::is_same_v<T, float>) {
    const auto* f = reinterpret_cast<const float*>(eight.words);
#pragma unroll
    for (int e = 0; e < 8; ++e) y[e] = f[e];
  } else {
    Vec8<T>::to_float(eight.words[0], y);
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] += weight * y[e];
}

// Rows whose loads are issued together before any is summed: enough bytes in flight per warp to keep HBM busy.
inline constexpr int kRowsInFlight = 4;

// acc = the sum over p < count (warp-uniform), in order of p, of weight_of(p) * vector v of row_of(p). row_of and
// weight_of may shuffle: the whole warp calls them; lanes with !active load nothing.
template <class T, bool kCoherent, class RowOf, class WeightOf>
__device__ __forceinline__ void sum_rows_in_order(int count, uint32_t v, bool active, RowOf row_of, WeightOf weight_of,
                                                  float* acc) {
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
  for (int p0 = 0; p0 < count; p0 += kRowsInFlight) {
    EightOf<T> eight[kRowsInFlight];
    float weight[kRowsInFlight];
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
      const T* row = row_of(p0 + u);
      weight[u] = weight_of(p0 + u);
      if (active && p0 + u < count) eight[u] = load_eight<T, kCoherent>(row, v);
    }
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
      if (active && p0 + u < count) accumulate_eight(eight[u], weight[u], acc);
    }
  }
}

template <class Transport, class T>
__device__ __forceinline__ void ht_combine_send(const HtArgs& a, const Transport& transport) {
  const HtLayout& l = a.l;
  const uint32_t W = l.world_size, k = l.experts_per_token;
  const uint32_t num_recv = min(a.h.recv_base[W], l.recv_rows);
  const uint32_t vectors = l.hidden_dim / 8;
  const uint64_t row_bytes = uint64_t(l.hidden_dim) * sizeof(T);
  const int lane = lane_id();
  const bool expert_layout = a.layout == HighThroughputLayout::kExpertContiguous;
  const bool carry_slots = a.combine_carry_slots;
  // The fault-tolerant mode: nothing once the others have masked this rank out (one verdict for the grid), nothing
  // for a lost rank's tokens.
  bool serving = true;
  if constexpr (Transport::kFaultTolerant) {
    serving = still_serving_grid(a, &a.workspace->combine_verdict, a.workspace->stopped != 0, Phase::kCombineSend);
  }
  bool issued_puts = false;
  for (uint32_t i = global_warp(); serving && i < num_recv; i += total_warps()) {
    if (Transport::kFaultTolerant && is_lost(transport, a, find_segment(a.h.recv_base, W, i))) continue;
    uint8_t* mine = a.local<uint8_t>(l.combine_row_offset(i));
    float* mine_slots = a.local<float>(l.combine_weights_row_offset(i));
    if (expert_layout) {
      int32_t slot_row = -1;
      float slot_weight = 0.0f;
      if (uint32_t(lane) < k) {
        slot_row = a.h.recv_slot_row[uint64_t(i) * k + lane];
        slot_weight = a.combine_row_weight == nullptr ? a.h.recv_slot_weight[uint64_t(i) * k + lane]
                      : slot_row >= 0                 ? a.combine_row_weight[slot_row]
                                                      : 0.0f;
        if (carry_slots) mine_slots[lane] = slot_row >= 0 ? a.combine_topk_weights[slot_row] : 0.0f;
      }
      // Lane p: the row and weight of the p-th valid slot, in k order.
      const unsigned slots = __ballot_sync(kFullMask, slot_row >= 0);
      int32_t placed_row = 0;
      float placed_weight = 0.0f;
      int place = 0;
      for (unsigned left = slots; left != 0; left &= left - 1, ++place) {
        const int from = __ffs(left) - 1;
        const int32_t r = __shfl_sync(kFullMask, slot_row, from);
        const float w = __shfl_sync(kFullMask, slot_weight, from);
        if (lane == place) placed_row = r, placed_weight = w;
      }
      const auto* rows = reinterpret_cast<const T*>(a.expert_out);
      for (uint32_t v0 = 0; v0 < vectors; v0 += kWarpSize) {
        const uint32_t v = v0 + uint32_t(lane);
        float acc[8];
        sum_rows_in_order<T, false>(
            __popc(slots), v, v < vectors,
            [&](int p) { return rows + uint64_t(__shfl_sync(kFullMask, placed_row, p & 31)) * l.hidden_dim; },
            [&](int p) { return __shfl_sync(kFullMask, placed_weight, p & 31); }, acc);
        if (v < vectors) Vec8<T>::store(reinterpret_cast<T*>(mine) + uint64_t(v) * 8, acc);
      }
    } else {
      if (!a.expert_out_staged) warp_copy_16<SourceKind::kInput>(mine, a.expert_out + i * row_bytes, row_bytes);
      if (carry_slots && uint32_t(lane) < k) mine_slots[lane] = a.combine_topk_weights[uint64_t(i) * k + lane];
    }
    if constexpr (Transport::kMayPut) {
      if (!transport.load_store_only()) {
        __syncwarp();
        const uint32_t s = find_segment(a.h.recv_base, W, i);
        const uint32_t home_row = a.h.home_base[s] + (i - a.h.recv_base[s]);
        const SymmetricRef<uint8_t> there{l.combine_recv_row_offset(home_row)};
        const SymmetricRef<uint8_t> slots_there{l.combine_recv_weights_row_offset(home_row)};
        if (uint8_t* direct = transport.peer(int(s), there)) {
          warp_copy_16<SourceKind::kPeerWritten>(direct, mine, row_bytes);
          if (carry_slots && uint32_t(lane) < k) {
            reinterpret_cast<float*>(transport.peer(int(s), slots_there))[lane] = mine_slots[lane];
          }
        } else {
          transport.put_warp(int(s), there, mine, row_bytes);
          if (carry_slots) transport.put_warp(int(s), slots_there, reinterpret_cast<uint8_t*>(mine_slots), k * 4);
          issued_puts = true;
        }
      }
    }
  }
  transport.flush_warp(issued_puts);
  if (!last_block_out(&a.workspace->phase[kHtCombineSent])) return;
  if (threadIdx.x == 0) a.workspace->phase[kHtCombineSent] = a.workspace->combine_verdict = 0;
  if (!serving) return;
  for (uint32_t r = threadIdx.x; r < W; r += blockDim.x) {
    if (is_lost(transport, a, r)) continue;
    transport.signal_add(int(r), SymmetricRef<uint64_t>{l.combine_ready_offset + uint64_t(l.rank) * 8}, 1);
  }
}

template <class Transport, class T>
__global__ void __launch_bounds__(kMaxBlockThreads, kMinBlocksPerSm) ht_combine_kernel(HtArgs a, Transport transport) {
  const HtLayout& l = a.l;
  const uint32_t W = l.world_size, k = l.experts_per_token;
  const uint64_t target = a.workspace->combine_calls + 1;
  ht_combine_send<Transport, T>(a, transport);

  bool missing = false;
  for (uint32_t r = threadIdx.x; r < W; r += blockDim.x) {
    missing |= wait_for_peer(
                   a, transport, a.local<uint64_t>(l.combine_ready_offset + uint64_t(r) * 8),
                   [&](uint64_t v) { return v >= target; }, Phase::kCombineRecv, r) < target;
  }
  bool reduce = !__syncthreads_or(missing);
  if constexpr (Transport::kFaultTolerant) {
    // The ranks agree on the lost set; every survivor then leaves the same ranks' rows out of its sums.
    agree_on_losses(a, transport, &a.workspace->phase[kHtAgreeing], Phase::kCombineRecv);
    reduce = !__syncthreads_or(threadIdx.x == 0 && masked_out(a.error));
  }
  const bool pull = transport.load_store_only();
  if (reduce) {
    const uint32_t vectors = l.hidden_dim / 8;
    const int lane = lane_id();
    auto* out = reinterpret_cast<T*>(a.combine_out);
    for (uint32_t t = global_warp(); t < a.m; t += total_warps()) {
      int32_t rank_row = -1, dest = -1;
      if (uint32_t(lane) < k) {
        rank_row = a.h.slot_rank_row[uint64_t(t) * k + lane];
        dest = a.h.slot_dest[uint64_t(t) * k + lane];
      }
      // This lane's row, if it has one, and the rows in rank order: lane i of `order` holds the i-th lowest rank.
      const T* row = nullptr;
      const uint32_t at = rank_row < 0 ? 0u : (pull ? a.h.base_at[dest] : a.h.send_base[dest]) + uint32_t(rank_row);
      // A row past the expert rank's capacity was never received there (it reported the overflow); a lost rank's
      // rows are left out.
      if (rank_row >= 0 && at < (pull ? l.recv_rows : l.combine_recv_rows) && !is_lost(transport, a, uint32_t(dest))) {
        const SymmetricRef<uint8_t> ref{pull ? l.combine_row_offset(at) : l.combine_recv_row_offset(at)};
        row = reinterpret_cast<const T*>(pull ? transport.peer(dest, ref) : a.local<uint8_t>(ref.offset));
      }
      const unsigned has = __ballot_sync(kFullMask, row != nullptr);
      if (a.combine_carry_slots) {
        // Slot j's value is in the slot row of the rank of its expert, beside that rank's row for the token (held
        // by the lane of the first slot naming that rank).
        const unsigned with_row = __match_any_sync(kFullMask, dest) & has;
        const uint32_t row_at = __shfl_sync(kFullMask, at, with_row != 0 ? __ffs(with_row) - 1 : lane);
        if (uint32_t(lane) < k) {
          float value = 0.0f;
          if (dest >= 0 && with_row != 0) {
            const SymmetricRef<uint8_t> ref{pull ? l.combine_weights_row_offset(row_at)
                                                 : l.combine_recv_weights_row_offset(row_at)};
            const auto* slots =
                reinterpret_cast<const float*>(pull ? transport.peer(dest, ref) : a.local<uint8_t>(ref.offset));
            value = __ldcg(slots + lane);
          }
          a.combine_out_topk_weights[uint64_t(t) * k + lane] = value;
        }
      }
      int order_key = row != nullptr ? dest : 0x7fffffff;
      uint32_t before = 0;  // lanes with a lower rank: this lane's place in rank order
      for (unsigned left = has; left != 0; left &= left - 1) {
        before += __shfl_sync(kFullMask, order_key, __ffs(left) - 1) < order_key;
      }
      const int rows = __popc(has);
      const T* sorted_row = nullptr;  // lane p: the row of the p-th lowest rank
      for (int place = 0; place < rows; ++place) {
        const unsigned at_place = __ballot_sync(kFullMask, row != nullptr && before == uint32_t(place));
        const auto address = __shfl_sync(kFullMask, reinterpret_cast<uintptr_t>(row), __ffs(at_place) - 1);
        if (lane == place) sorted_row = reinterpret_cast<const T*>(address);
      }
      for (uint32_t v0 = 0; v0 < vectors; v0 += kWarpSize) {
        const uint32_t v = v0 + uint32_t(lane);
        float acc[8];
        sum_rows_in_order<T, true>(
            rows, v, v < vectors,
            [&](int p) {
              return reinterpret_cast<const T*>(
                  __shfl_sync(kFullMask, reinterpret_cast<uintptr_t>(sorted_row), p & 31));
            },
            [](int) { return 1.0f; }, acc);
        if (v < vectors) Vec8<T>::store(out + uint64_t(t) * l.hidden_dim + uint64_t(v) * 8, acc);
      }
    }
  }
  if (!last_block_out(&a.workspace->phase[kHtCombineDone])) return;
  if (threadIdx.x == 0) {
    a.workspace->phase[kHtCombineDone] = 0;
    a.workspace->combine_calls = target;
  }
}

}  // namespace expertwire::device
