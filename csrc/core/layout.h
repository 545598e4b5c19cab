// Every buffer size, per-token stride and signal offset of expertwire, computed in this one place.
//
// Symmetric memory (one allocation per rank, same layout on every rank; peers write into it):
//
//   dispatch_recv   [num_dp_groups][max_num_tokens] DispatchToken
//                   DispatchToken = header (u32 source token, u32 experts[top-k], padded to 16 B)
//                                 | payload (hidden_dim_bytes) | scales (hidden_dim_scale_bytes, padded to 16 B)
//                   One region per source DP group, for the push dispatch: the one rank of that group whose
//                   dp_rank equals ours puts each of its tokens there once, however many of our experts the
//                   token names, so slots need no cross-rank coordination.
//   combine_recv    [max_num_tokens][top-k] expert output rows of hidden_dim 16-bit values; row (t, k) is
//                   written by the owner of expert indices[t][k], so the reduction reads each row exactly once.
//   dispatch_counts [world_size] u64: count + 1 from each source rank (0 = not arrived).
//   combine_done    [world_size] ArrivalSignal: complete once every block of that rank has put its combine rows
//                   where we read them; its payload says where (CombineRowsAt in the kernels).
//   loss_posts      [world_size][loss_words] u64 LossPost: what each rank last told us of the ranks it has given
//                   up on (the fault-tolerant mode; device/liveness.cuh), 32 ranks a word.
//   staging         [staging_slots] rows of max(DispatchToken, combine row): the source of NVSHMEM puts to
//                   peers that are not load/store reachable (RDMA needs a registered source).
//   send_rows       [max_num_tokens] DispatchToken: this rank's tokens, staged once for peers that pull them
//                   with loads (the pull dispatch, used when every peer is load/store reachable).
//   send_announce   u64 (epoch << 32) | m: set when this rank's pull dispatch `epoch` starts, m its token count.
//   send_stamps     [max_num_tokens] u64: the epoch of the pull dispatch that last staged send_rows[t], set
//                   (with release) once the row is written, so receivers copy each row as soon as it is there.
//                   Nothing is cleared between dispatches: the epoch tells them apart (see dispatch_epoch).
//   combine_slots   [num_dp_groups][max_num_tokens][top-k] u32: the row of expert_outputs that holds the output
//                   of token (group, t) for its k-th expert, when that expert is ours; written by the pull
//                   dispatch, read by the tokens' ranks in the pull combine.
//   expert_outputs  [num_local_experts][max_recv_tokens] rows of hidden_dim 16-bit values, expert_y's layout:
//                   where the pull combine's readers find our experts' outputs when the experts wrote them here
//                   (AllToAll::expert_output_buffer); a caller's expert_y is pushed to combine_recv instead.
//
// Local workspace (cudaMalloc, this rank only):
//   send_counts     [world_size] u32: tokens this rank has sent to each rank in the running push dispatch.
//   recv_counts     [num_local_experts] i32: tokens received per local expert by the last dispatch.
//   routes          [num_local_experts][max_recv_tokens] u64: where row i of out_expert_x came from
//                   (source DP group, token, k), read by combine to send each result back.
//   phase_counters  [kNumPhaseCounters] u32: blocks that finished a push phase (the last one signals / resets).
//   pull_state      u32 state of the pull dispatch's receive (PullReceiveState): [num_local_experts] rows of
//                   out_expert_x taken, [num_dp_groups] next token of each sender, and the blocks that have
//                   finished. The push dispatch's receive takes rows with the first part too; both receives zero
//                   that part when they hand its counts over, and the next pull combine zeroes the rest.
//   dispatch_epoch  u32: the pull dispatches this rank has finished (modulo 2^32 - 1), advanced by the combine
//                   after each; the next dispatch's epoch follows from it (DispatchEpoch), never 0.
//                   Every rank counts the same collective calls, and the count lives on the device so that
//                   CUDA graph replays advance it too.
//   active_ranks    [world_size] i32: 1 for a rank this rank still serves with, 0 for one it has masked (the
//                   fault-tolerant mode); the caller reads it (AllToAll::active_ranks).
//   liveness        LivenessWords: the fault-tolerant mode's counters (device/liveness.cuh).
//   settled_counts  [world_size] u64: the fault-tolerant push receive's count from each sender as the whole grid
//                   takes it (DispatchCount, or a lost sender's SettledCount::kLost), settled by the first block
//                   to read it, so that a loss marked mid-phase leaves every block with the same counts.
//
// The encodings of what ranks write into each other's regions: device/wire_protocol.h. Who writes, reads and
// resets each region, and why no write overtakes a read: device/rank_state.h.
#pragma once

#include <cstdint>
#include <vector>

#include "expertwire/config.h"
#include "expertwire/host_device.h"

namespace expertwire {

EW_HOST_DEVICE constexpr uint64_t align_up(uint64_t value, uint64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

inline constexpr uint64_t kBufferAlign = 16;         // every row and region starts on a 16-byte vector boundary
inline constexpr uint64_t kRegionAlign = 256;        // regions of the symmetric allocation start 256-aligned
inline constexpr uint64_t kCombineElementBytes = 2;  // expert outputs are bf16 or fp16
inline constexpr int kNumPhaseCounters = 4;
inline constexpr uint64_t kTokenRouteBytes = 8;      // a TokenRoute (device/wire_protocol.h)
inline constexpr uint64_t kLivenessWordsBytes = 16;  // LivenessWords (device/rank_state.h)

enum PhaseCounter : int {
  kDispatchSendDone = 0,
  kDispatchRecvDone = 1,
  kCombineSendDone = 2,   // the combine's send where some peer takes puts
  kCombineWaitsDone = 3,  // the fault-tolerant combine's waits, before its agreement on lost ranks
};

// Plain offsets and strides, copied by value into kernels.
struct BufferLayout {
  // Shape, repeated here so kernels need nothing else.
  uint32_t num_experts;
  uint32_t num_local_experts;
  uint32_t experts_per_token;
  uint32_t world_size;
  uint32_t dp_size;
  uint32_t num_dp_groups;
  uint32_t max_num_tokens;
  uint32_t max_recv_tokens;
  uint32_t hidden_dim;
  uint32_t hidden_dim_bytes;
  uint32_t hidden_dim_scale_bytes;

  // Strides.
  uint64_t token_header_bytes;    // align16(4 + 4 * top-k)
  uint64_t dispatch_token_bytes;  // header + payload + align16(scales)
  uint64_t combine_row_bytes;     // hidden_dim * 2
  uint64_t staging_row_bytes;     // max(dispatch_token_bytes, combine_row_bytes)

  // Symmetric allocation: offsets from its base, and its size.
  uint64_t dispatch_recv_offset;
  uint64_t combine_recv_offset;
  uint64_t dispatch_counts_offset;
  uint64_t combine_done_offset;
  uint64_t loss_posts_offset;
  uint32_t loss_words;  // u64 words of a rank's LossPost, 32 ranks each
  uint64_t staging_offset;
  uint64_t staging_slots;
  uint64_t send_rows_offset;
  uint64_t send_announce_offset;
  uint64_t send_stamps_offset;
  uint64_t combine_slots_offset;
  uint64_t expert_outputs_offset;
  uint64_t symmetric_bytes;

  // Local workspace: offsets from its base, and its size.
  uint64_t send_counts_offset;
  uint64_t recv_counts_offset;
  uint64_t routes_offset;
  uint64_t phase_counters_offset;
  uint64_t pull_state_offset;
  uint64_t dispatch_epoch_offset;
  uint64_t active_ranks_offset;
  uint64_t liveness_offset;
  uint64_t settled_counts_offset;
  uint64_t workspace_bytes;

  EW_HOST_DEVICE uint64_t payload_offset_in_token() const { return token_header_bytes; }
  EW_HOST_DEVICE uint64_t scale_offset_in_token() const { return token_header_bytes + hidden_dim_bytes; }

  // Byte offset (from the symmetric base) of slot `slot` of source group `source_group`'s region.
  EW_HOST_DEVICE uint64_t dispatch_token_offset(uint32_t source_group, uint32_t slot) const {
    return dispatch_recv_offset + (uint64_t(source_group) * max_num_tokens + slot) * dispatch_token_bytes;
  }
  EW_HOST_DEVICE uint64_t combine_row_offset(uint32_t token, uint32_t k) const {
    return combine_recv_offset + (uint64_t(token) * experts_per_token + k) * combine_row_bytes;
  }
  EW_HOST_DEVICE uint64_t dispatch_count_offset(uint32_t source_rank) const {
    return dispatch_counts_offset + uint64_t(source_rank) * sizeof(uint64_t);
  }
  EW_HOST_DEVICE uint64_t combine_done_offset_of(uint32_t source_rank) const {
    return combine_done_offset + uint64_t(source_rank) * sizeof(uint64_t);
  }
  EW_HOST_DEVICE uint64_t staging_row_offset(uint64_t slot) const { return staging_offset + slot * staging_row_bytes; }
  EW_HOST_DEVICE uint64_t send_row_offset(uint32_t token) const {
    return send_rows_offset + uint64_t(token) * dispatch_token_bytes;
  }
  EW_HOST_DEVICE uint64_t send_stamp_offset(uint32_t token) const {
    return send_stamps_offset + uint64_t(token) * sizeof(uint64_t);
  }
  EW_HOST_DEVICE uint64_t combine_slot_offset(uint32_t source_group, uint32_t token, uint32_t k) const {
    return combine_slots_offset +
           ((uint64_t(source_group) * max_num_tokens + token) * experts_per_token + k) * sizeof(uint32_t);
  }
  EW_HOST_DEVICE uint64_t expert_output_offset(uint32_t local_expert, uint32_t row) const {
    return expert_outputs_offset + (uint64_t(local_expert) * max_recv_tokens + row) * combine_row_bytes;
  }
  EW_HOST_DEVICE uint64_t loss_post_offset(uint32_t source_rank, uint32_t word) const {
    return loss_posts_offset + (uint64_t(source_rank) * loss_words + word) * sizeof(uint64_t);
  }
  // u32 words of pull_state (see PullReceiveState).
  EW_HOST_DEVICE uint64_t pull_state_words() const { return uint64_t(num_local_experts) + num_dp_groups + 1; }
  EW_HOST_DEVICE uint64_t route_offset(uint32_t local_expert, uint32_t row) const {
    return routes_offset + (uint64_t(local_expert) * max_recv_tokens + row) * kTokenRouteBytes;
  }
};

// Buffer-size arithmetic: 64-bit products and sums that throw ConfigError naming `what` when they overflow, and
// place(), which appends a region of `bytes` at the next `alignment` boundary of `cursor` and returns its offset.
uint64_t checked_mul(uint64_t a, uint64_t b, const char* what);
uint64_t checked_add(uint64_t a, uint64_t b, const char* what);
uint64_t place(uint64_t& cursor, uint64_t bytes, uint64_t alignment, const char* what);

// Computes the layout of a validated configuration. Throws ConfigError when a size overflows 64 bits.
// `staging_slots` is the number of warps that may stage a row at once (blocks * warps per block).
BufferLayout make_buffer_layout(const AllToAllConfig& config, uint64_t staging_slots);

// Throws ConfigError when the symmetric allocation does not fit in `heap_bytes`, saying how much is needed.
void require_fits_symmetric_heap(uint64_t symmetric_bytes, uint64_t heap_bytes);

// What every rank's layout must agree on: a rank whose offsets differ would read and write the wrong bytes of its
// peers' buffers. Plain words, exchanged between the ranks at construction; kNames says what each one is.
struct LayoutSignature {
  static constexpr int kWords = 11;
  static constexpr const char* kNames[kWords] = {
      "num_experts",
      "experts_per_token",
      "world_size",
      "dp_size",
      "max_num_tokens",
      "hidden_dim",
      "hidden_dim_bytes",
      "hidden_dim_scale_bytes",
      "staging rows (one per warp of the launch: max_sm_count, EXPERTWIRE_NUM_BLOCKS, EXPERTWIRE_BLOCK_THREADS)",
      "symmetric buffer bytes",
      "fault_tolerant (AllToAllOptions)"};
  uint64_t words[kWords];
};
LayoutSignature layout_signature(const BufferLayout& layout, bool fault_tolerant = false);

// Throws ConfigError, the same on every rank that passes the same signatures, naming the first word in which a
// rank's signature (by_rank[r]) differs from rank 0's.
void require_same_layout(const std::vector<LayoutSignature>& by_rank);

}  // namespace expertwire
