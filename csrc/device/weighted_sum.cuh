// The weighted reduction of combine's receive half, written once for both combine forms: out[t] = sum_k
// weights[t][k] * row(t, k) in fp32, where each form says where row (t, k) is.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "device/expert_row.cuh"
#include "device/kernel_args.h"
#include "device/primitives.cuh"
#include "device/vec8.cuh"

namespace expertwire::device {

// out[t] = sum_k weights[t][k] * row(t, k) for the first bound_m tokens, in fp32, written as OutT. `row_of(t, k,
// expert)` gives the address of the expert output row of (t, k) for a valid expert, or nullptr for a row that
// adds nothing; it may take dependent loads (a slot read from a peer). A work item is a run of chunks (32 vectors of 8
// elements, one per lane) of one token; runs are as long as keeps about kItemsPerWarp items per warp, so every warp has
// work. A warp looks up the rows of 32 / top_k of its items at once, lane i row i % top_k of item i / top_k, into its
// row table: one round trip of index, weight and slot loads for all of them, not one per item. Then every lane loads
// its vector of eight rows before summing any. Sums stay in k order, as the reference's. kWide: top_k > 32, whose rows
// a table holds a pass of 32 at a time (weighted_sum_rows picks; apart, neither spills registers).
template <bool kWide, class OutT, class ExpertT, class RowOf>
__device__ __forceinline__ void weighted_sum_rows_of(const CombineArgs& a, RowOf row_of) {
  const RankContext& c = a.ctx;
  const BufferLayout& l = c.layout;
  const uint32_t m = read_bound_m(a.bound_m, a.m, c.error, Phase::kCombineRecv);
  const uint32_t top_k = l.experts_per_token;
  const uint32_t vectors = l.hidden_dim / 8;
  auto* out = static_cast<OutT*>(a.out_tokens);
  constexpr uint32_t kBatch = 8;
  constexpr uint32_t kItemsPerWarp = 4;
  __shared__ const int4* row_table[kMaxBlockThreads / kWarpSize][kWarpSize];
  __shared__ float weight_table[kMaxBlockThreads / kWarpSize][kWarpSize];
  const int4** table_rows = row_table[warp_id()];
  float* table_weights = weight_table[warp_id()];

  const uint32_t chunks = (vectors + kWarpSize - 1) / kWarpSize;
  const uint32_t warps = uint32_t(total_warps());
  // Wide rows look up every pass of 32 again: one item a table, one chunk an item. Work items are counted in 32
  // bits (AllToAllConfig::validate bounds max_num_tokens * chunks).
  const uint32_t balanced_run = (m * chunks + kItemsPerWarp * warps - 1) / (kItemsPerWarp * warps);
  const uint32_t run = kWide ? 1u : balanced_run < 1 ? 1u : balanced_run > chunks ? chunks : balanced_run;
  const uint32_t runs_per_token = (chunks + run - 1) / run;
  const uint32_t items = m * runs_per_token;
  const uint32_t items_per_table = kWide ? 1u : kWarpSize / top_k;
  const int lane = lane_id();
  // Lane `lane` looks up row k of `item` (any lane past the items, or past top_k, writes an empty entry).
  auto fill_table = [&](uint32_t item, uint32_t k, bool valid) {
    __syncwarp();  // every lane is done with the last table
    const int4* row = nullptr;
    float weight = 0.0f;
    if (valid && item < items && k < top_k) {
      const uint32_t t = item / runs_per_token;
      const uint32_t expert = ExpertRow(a.indices, t, top_k)[k];
      // Rows of invalid experts were never sent (dispatch reported them): they add nothing, as does a row
      // row_of gives as nullptr.
      if (expert < l.num_experts) {
        row = row_of(t, k, expert);
        weight = a.weights[uint64_t(t) * top_k + k];
      }
    }
    table_rows[lane] = row;
    table_weights[lane] = weight;
    __syncwarp();
  };
  for (uint32_t first_item = global_warp(); first_item < items; first_item += warps * items_per_table) {
    const uint32_t lane_item = uint32_t(lane) / top_k;
    if (!kWide) fill_table(first_item + lane_item * warps, uint32_t(lane) % top_k, lane_item < items_per_table);
    for (uint32_t j = 0; j < items_per_table; ++j) {
      const uint32_t item = first_item + j * warps;
      if (item >= items) break;
      const uint32_t t = item / runs_per_token;
      const uint32_t first_chunk = item % runs_per_token * run;
      const uint32_t end_chunk = min(chunks, first_chunk + run);
      const int4* const* rows = table_rows + j * top_k;  // j is 0 for wide rows (a table per item)
      const float* weights_of_k = table_weights + j * top_k;
      for (uint32_t chunk = first_chunk; chunk < end_chunk; ++chunk) {
        const uint32_t v = chunk * kWarpSize + lane;
        float acc[8] = {};
        for (uint32_t k0 = 0; k0 < top_k; k0 += kWarpSize) {
          if (kWide) fill_table(item, k0 + uint32_t(lane), true);
          if (v >= vectors) continue;
          const uint32_t pass = min(uint32_t(kWarpSize), top_k - k0);
          for (uint32_t k1 = 0; k1 < pass; k1 += kBatch) {
            int4 raw[kBatch];
#pragma unroll
            for (uint32_t u = 0; u < kBatch; ++u) {
              raw[u] = k1 + u < pass && rows[k1 + u] != nullptr ? rows[k1 + u][v] : int4{0, 0, 0, 0};
            }
#pragma unroll
            for (uint32_t u = 0; u < kBatch; ++u) {
              if (k1 + u >= pass || rows[k1 + u] == nullptr) continue;
              float y[8];
              Vec8<ExpertT>::to_float(raw[u], y);
              const float w = weights_of_k[k1 + u];
#pragma unroll
              for (int e = 0; e < 8; ++e) acc[e] += w * y[e];
            }
          }
        }
        if (v < vectors) Vec8<OutT>::store(out + uint64_t(t) * l.hidden_dim + uint64_t(v) * 8, acc);
      }
    }
  }
}

template <class OutT, class ExpertT, class RowOf>
__device__ __forceinline__ void weighted_sum_rows(const CombineArgs& a, RowOf row_of) {
  if (a.ctx.layout.experts_per_token > kWarpSize) {
    weighted_sum_rows_of<true, OutT, ExpertT>(a, row_of);
  } else {
    weighted_sum_rows_of<false, OutT, ExpertT>(a, row_of);
  }
}

}  // namespace expertwire::device
