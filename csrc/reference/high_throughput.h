// CPU reference model of the high-throughput all-to-all, for prefill and training: layouts sized by the real
// token counts instead of padded per-expert blocks. The oracle its GPU tests will compare against.
//
// Semantics. Every rank s holds its own m_s tokens (no DP groups); token t names up to experts_per_token experts
// in topk_idx[t] (-1: no expert in that slot), with router weights topk_weights[t]. Expert e lives on rank
// e / num_local_experts as local expert e % num_local_experts.
//  * Dispatch, rank-packed layout: rank r receives each token (s, t) that names at least one of its experts once,
//    however many of them it names: its payload, scales, recv_topk_idx[k] = the local index of topk_idx[t][k]
//    where that expert is on r, else -1, and recv_topk_weights[k] = topk_weights[t][k] there, else 0.
//  * Dispatch, expert-contiguous layout: rank r's rows are grouped by local expert; local expert le's segment
//    holds every token that names it, one row each, with the weight of that k, and starts at a multiple of
//    expert_alignment; rows between segments are padding (expert -1, weight 0).
//  * Combine, rank-packed: the caller's rows are already one per (token, rank); token (s, t) on rank s gets the
//    sum, in fp32 and in rank order, of its rows from every rank that received it.
//  * Combine, expert-contiguous: rank r first sums, per received token, weight * row of each of its segments that
//    hold the token (fp32, in k order); that partial sum travels to the token's rank rounded to the row type, and
//    is summed there in rank order as in the rank-packed combine.
// Row order within a rank's rows (or a segment) is not part of the contract: results are keyed by (source rank,
// token), and the model lists them in that order.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "expertwire/dtype.h"

namespace expertwire::reference {

// The sizes of one high-throughput all-to-all.
struct HighThroughputShape {
  int64_t max_tokens_per_rank = 0;
  int64_t num_experts = 0;
  int64_t experts_per_token = 0;
  int64_t world_size = 0;
  int64_t hidden_dim_bytes = 0;        // dispatch payload bytes per token
  int64_t hidden_dim_scale_bytes = 0;  // dispatch scale bytes per token (0: none)
  int64_t expert_alignment = 1;        // expert-contiguous segments start at multiples of this many rows

  int64_t num_local_experts() const { return num_experts / world_size; }
  // Throws ConfigError naming the first invalid field.
  void validate() const;
};

// One source rank's tokens for one call.
struct RankTokens {
  int64_t m = 0;
  const uint8_t* x = nullptr;           // [m][hidden_dim_bytes]
  const uint8_t* x_scale = nullptr;     // [m][hidden_dim_scale_bytes], or null without scales
  const int64_t* topk_idx = nullptr;    // [m][experts_per_token]; -1: no expert
  const float* topk_weights = nullptr;  // [m][experts_per_token]
};

// A token a rank receives, once (rank-packed layout) or once per segment (expert-contiguous layout).
struct ReceivedRow {
  uint32_t source_rank = 0;
  uint32_t token = 0;
  const uint8_t* x = nullptr;        // the sender's row of x
  const uint8_t* x_scale = nullptr;  // the sender's row of x_scale, or null
};

// What rank `rank` receives in the rank-packed layout.
struct RankPackedReceive {
  std::vector<ReceivedRow> rows;           // by (source rank, token)
  std::vector<int64_t> recv_topk_idx;      // [rows][experts_per_token]: local expert index, or -1
  std::vector<float> recv_topk_weights;    // [rows][experts_per_token]: the weight where the index is local, else 0
  std::vector<int64_t> tokens_per_expert;  // [num_local_experts]: rows that name each local expert
};

// What rank `rank` receives in the expert-contiguous layout.
struct ExpertContiguousReceive {
  std::vector<int64_t> tokens_per_expert;  // [num_local_experts]
  std::vector<int64_t> segment_start;  // [num_local_experts + 1]: first row of each segment; the last, the rows in all
  // One entry per row of the layout, padding included: its token (padding: source_rank and token unset, expert -1),
  // its local expert and its weight.
  std::vector<ReceivedRow> rows;
  std::vector<int64_t> row_expert;  // local expert of each row, -1 on padding rows
  std::vector<float> row_weight;    // that expert's weight for the row's token, 0 on padding rows
};

// Both throw ConfigError, naming the rank, token and slot, on an index outside [-1, num_experts), on an expert
// repeated in one token's slots, and on m outside [0, max_tokens_per_rank]. `sources` holds every rank's tokens.
RankPackedReceive dispatch_rank_packed(const HighThroughputShape& shape, int64_t rank,
                                       const std::vector<RankTokens>& sources);
ExpertContiguousReceive dispatch_expert_contiguous(const HighThroughputShape& shape, int64_t rank,
                                                   const std::vector<RankTokens>& sources);

// Rank `rank`'s row for its received token (source_rank, token) in the rank-packed combine: hidden_dim floats,
// the exact values the GPU holds (already rounded to the type they travel as).
using RankRowFn = std::function<const float*(uint32_t rank, uint32_t source_rank, uint32_t token)>;
// Expert output of local expert `local_expert` of `rank` for its token (source_rank, token): hidden_dim floats,
// as the GPU holds them.
using ExpertRowFn =
    std::function<const float*(uint32_t rank, uint32_t local_expert, uint32_t source_rank, uint32_t token)>;

// out[t][0..hidden_dim) of rank `rank`'s tokens t < sources[rank].m, in fp32: the rank-packed combine.
void combine_rank_packed(const HighThroughputShape& shape, int64_t rank, const std::vector<RankTokens>& sources,
                         int64_t hidden_dim, const RankRowFn& row, float* out);
// The expert-contiguous combine: each rank's partial sum of a token is rounded to `row_type` (float32 keeps it)
// before it travels.
void combine_expert_contiguous(const HighThroughputShape& shape, int64_t rank, const std::vector<RankTokens>& sources,
                               int64_t hidden_dim, ScalarType row_type, const ExpertRowFn& expert_row, float* out);

// Rows a rank needs in each layout for these tokens: the exact receive capacity a count exchange would size.
int64_t rank_packed_rows(const HighThroughputShape& shape, int64_t rank, const std::vector<RankTokens>& sources);
int64_t expert_contiguous_rows(const HighThroughputShape& shape, int64_t rank, const std::vector<RankTokens>& sources);

}  // namespace expertwire::reference
