// Every size and offset of the high-throughput all-to-all (expertwire/high_throughput.h), computed once.
//
// Symmetric memory (one allocation per rank, the same layout on every rank):
//   count_rows      [world][count_row_words] u32: row s, written by rank s in each dispatch: the tokens s sends
//                   to every rank [world], then to each of our local experts [num_local_experts], then s's m and
//                   s's payload bytes per token (which every rank must agree on).
//   count_out       [world][count_row_words] u32: the rows this rank sends, staged as the source of puts.
//   count_arrived   [world] u64: +1 from rank s when its count row of the running dispatch is written (and, with
//                   loads and stores, its token records and input rows); monotonic, never reset.
//   data_arrived    [world] u64: +1 from rank s when it has put every row of the running dispatch here (push).
//   combine_ready   [world] u64: +1 from rank s when its combine rows for us are ready (pull: in its
//                   combine_rows; push: put into our combine_recv).
//   loss_posts      [world][loss_words] u64 LossPost: what each rank last told us of the ranks it has given up
//                   on (the fault-tolerant mode; device/liveness.cuh), 32 ranks a word.
//   recv_bases      [world] u64 RecvBase from rank r (the fault-tolerant mode): where our rows start at r, as r
//                   derived it, for the running dispatch.
//   token_records   [max_num_tokens] TokenRecord: this rank's tokens' routes, read by receivers that pull.
//   input_rows      [max_num_tokens] input rows: payload | scales, each 16-byte aligned; receivers pull from here.
//   staging_records [recv_rows] TokenRecord and staging_rows [recv_rows] input rows: what senders put (push).
//   combine_rows    [recv_rows] rows of hidden_dim * combine_element_bytes: this rank's rank-packed combine input.
//   combine_recv    [max_num_tokens * min(k, world)] combine rows: what expert ranks put back (push).
//   combine_weights [recv_rows] rows of k f32, and combine_recv_weights [max_num_tokens * min(k, world)] (push):
//                   the per-slot values a combine may carry back beside its rows (training's weight gradients).
//
// Local workspace (device/ht_args.h, HtWorkspace): dispatch_calls and combine_calls (u64, the targets of the
// monotonic signals: every rank counts the same collective calls, on the device so that graph replays count too),
// phase counters, and the fault-tolerant mode's active_ranks and counters.
//
// A rank starts dispatch n+1 only after its combine n, which waits for every rank's combine n input, which each
// rank provides only after its dispatch n has received everything: nothing a peer still reads is rewritten.
#pragma once

#include <cstdint>

#include "core/layout.h"
#include "expertwire/high_throughput.h"
#include "expertwire/host_device.h"

namespace expertwire {

// Tokens a route block handles (one thread each).
inline constexpr uint32_t kRouteBlockTokens = 64;

// What a sender publishes about token t, for k slots: per slot the row among the tokens it sends to that slot's
// rank (-1 unless the slot is the first to name that rank), the row among its tokens of that slot's expert, the
// expert (-1: none) and its weight. Four arrays of k 32-bit words.
struct TokenRecordLayout {
  uint32_t k;
  EW_HOST_DEVICE uint64_t bytes() const { return align_up(uint64_t(16) * k, kBufferAlign); }
};

struct HtLayout {
  uint32_t rank;
  uint32_t world_size;
  uint32_t num_experts;
  uint32_t num_local_experts;
  uint32_t experts_per_token;
  uint32_t max_num_tokens;
  uint32_t recv_rows;
  uint32_t combine_recv_rows;
  uint32_t hidden_dim;
  uint32_t hidden_dim_bytes;
  uint32_t hidden_dim_scale_bytes;
  uint32_t combine_element_bytes;
  uint32_t expert_alignment;
  uint32_t count_row_words;
  uint32_t max_route_blocks;
  uint32_t loss_words;  // u64 words of a rank's LossPost, 32 ranks each

  uint64_t record_bytes;       // a TokenRecord
  uint64_t input_row_bytes;    // align16(hidden_dim_bytes) + align16(scales)
  uint64_t scale_offset;       // of the scales in an input row
  uint64_t combine_row_bytes;  // hidden_dim * combine_element_bytes
  uint64_t slot_row_bytes;     // k f32, 16-byte aligned: a row of combine_weights

  uint64_t count_rows_offset;
  uint64_t count_out_offset;
  uint64_t count_arrived_offset;
  uint64_t data_arrived_offset;
  uint64_t combine_ready_offset;
  uint64_t loss_posts_offset;
  uint64_t recv_bases_offset;
  uint64_t token_records_offset;
  uint64_t input_rows_offset;
  uint64_t staging_records_offset;
  uint64_t staging_rows_offset;
  uint64_t combine_rows_offset;
  uint64_t combine_recv_offset;
  uint64_t combine_weights_offset;
  uint64_t combine_recv_weights_offset;
  uint64_t symmetric_bytes;

  // Words of a count row after the per-rank and per-expert counts: the sender's m and its payload bytes per token.
  EW_HOST_DEVICE uint32_t count_word_m() const { return world_size + num_local_experts; }
  EW_HOST_DEVICE uint32_t count_word_x_bytes() const { return world_size + num_local_experts + 1; }
  EW_HOST_DEVICE uint64_t count_row_offset(uint32_t source) const {
    return count_rows_offset + uint64_t(source) * count_row_words * 4;
  }
  EW_HOST_DEVICE uint64_t count_out_row_offset(uint32_t dest) const {
    return count_out_offset + uint64_t(dest) * count_row_words * 4;
  }
  EW_HOST_DEVICE uint64_t loss_post_offset(uint32_t source, uint32_t word) const {
    return loss_posts_offset + (uint64_t(source) * loss_words + word) * 8;
  }
  EW_HOST_DEVICE uint64_t recv_base_offset(uint32_t receiver) const { return recv_bases_offset + receiver * 8ull; }
  EW_HOST_DEVICE uint64_t token_record_offset(uint32_t t) const { return token_records_offset + t * record_bytes; }
  EW_HOST_DEVICE uint64_t input_row_offset(uint32_t t) const { return input_rows_offset + t * input_row_bytes; }
  EW_HOST_DEVICE uint64_t staging_record_offset(uint32_t row) const {
    return staging_records_offset + uint64_t(row) * record_bytes;
  }
  EW_HOST_DEVICE uint64_t staging_row_offset(uint32_t row) const {
    return staging_rows_offset + uint64_t(row) * input_row_bytes;
  }
  EW_HOST_DEVICE uint64_t combine_row_offset(uint32_t row) const {
    return combine_rows_offset + uint64_t(row) * combine_row_bytes;
  }
  EW_HOST_DEVICE uint64_t combine_recv_row_offset(uint32_t row) const {
    return combine_recv_offset + uint64_t(row) * combine_row_bytes;
  }
  EW_HOST_DEVICE uint64_t combine_weights_row_offset(uint32_t row) const {
    return combine_weights_offset + uint64_t(row) * slot_row_bytes;
  }
  EW_HOST_DEVICE uint64_t combine_recv_weights_row_offset(uint32_t row) const {
    return combine_recv_weights_offset + uint64_t(row) * slot_row_bytes;
  }
};

// The layout of a validated configuration; `may_put`: the push regions (staging, combine_recv) are allocated.
HtLayout make_ht_layout(const HighThroughputConfig& config, bool may_put);
LayoutSignature ht_layout_signature(const HtLayout& layout, bool fault_tolerant = false);

// The handle's device memory, in 32-bit words, and where each array starts (word offsets).
struct HtHandleLayout {
  uint64_t block_counts;       // [max_route_blocks][world + num_experts] u32
  uint64_t slot_rank_row;      // [max_num_tokens][k] i32
  uint64_t slot_expert_row;    // [max_num_tokens][k] i32
  uint64_t slot_dest;          // [max_num_tokens][k] i32: the rank of each slot's expert, -1 for no expert
  uint64_t recv_base;          // [world + 1] u32: first rank-packed row from each source
  uint64_t base_at;            // [world] u32: our first row at each rank (its recv_base[rank])
  uint64_t send_base;          // [world + 1] u32: prefix of the tokens we send to each rank (combine_recv rows)
  uint64_t home_base;          // [world] u32: where our rows for source s land in its combine_recv
  uint64_t segment_start;      // [num_local_experts + 1] u32
  uint64_t tokens_per_expert;  // [num_local_experts] u32
  uint64_t expert_prefix;      // [world][num_local_experts] u32: rows of each expert from lower sources
  uint64_t source_m;           // [world] u32
  uint64_t recv_slot_row;      // [recv_rows][k] i32: expert-contiguous row of each slot of a received token, or -1
  uint64_t recv_slot_weight;   // [recv_rows][k] f32
  uint64_t words;
};
HtHandleLayout make_ht_handle_layout(const HtLayout& layout);

}  // namespace expertwire
