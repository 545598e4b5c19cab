// Arguments of the dispatch and combine kernels: plain structs that host code fills and passes by value.
#pragma once

#include <cstdint>

#include "core/layout.h"
#include "device/error_record.h"

namespace expertwire::device {

// What every kernel needs to know about this rank.
struct RankContext {
  BufferLayout layout;
  uint32_t rank;
  uint32_t dp_rank;
  uint32_t dp_group;
  uint8_t* symmetric;   // this rank's symmetric buffer
  uint8_t* workspace;   // this rank's local workspace
  ErrorRecord* error;   // host-mapped
  uint64_t timeout_ns;

  EW_HOST_DEVICE uint32_t* phase_counter(PhaseCounter which) const {
    return reinterpret_cast<uint32_t*>(workspace + layout.phase_counters_offset) + which;
  }
  EW_HOST_DEVICE uint64_t* local_signal(uint64_t offset) const {
    return reinterpret_cast<uint64_t*>(symmetric + offset);
  }
  EW_HOST_DEVICE uint32_t* dispatch_epoch_counter() const {
    return reinterpret_cast<uint32_t*>(workspace + layout.dispatch_epoch_offset);
  }
};

struct DispatchArgs {
  RankContext ctx;
  int32_t* out_expert_num_tokens;  // [num_local_experts]
  uint8_t* out_expert_x;           // [num_local_experts][max_recv_tokens][hidden_dim_bytes]
  uint8_t* out_expert_x_scale;     // [num_local_experts][max_recv_tokens][hidden_dim_scale_bytes / 4] words
  const uint8_t* dp_x;             // [m][hidden_dim_bytes], rows dp_x_row_stride bytes apart
  const uint8_t* dp_x_scale;       // [m][hidden_dim_scale_bytes / 4] words
  ScaleStrides out_expert_x_scale_strides;
  ScaleStrides dp_x_scale_strides;  // expert unused
  const uint32_t* indices;         // [m][experts_per_token]
  uint32_t m;
  const uint32_t* bound_m;  // device; may be null (then m)
  bool do_send;
  bool do_recv;
  uint64_t dp_x_row_stride;
  // dp_x / dp_x_scale are where the pull dispatch stages them (AllToAll::dispatch_input_buffer): not copied.
  bool dp_x_in_send_rows;
  bool dp_x_scale_in_send_rows;
};

struct CombineArgs {
  RankContext ctx;
  void* out_tokens;          // [m][hidden_dim] OutT
  const uint32_t* indices;   // [m][experts_per_token]
  const float* weights;      // [m][experts_per_token]
  const uint8_t* expert_y;   // [num_local_experts][max_recv_tokens][hidden_dim] ExpertT
  uint32_t m;
  const uint32_t* bound_m;
  bool do_send;
  bool do_recv;
};

// Dynamic shared memory of each kernel, per block.
inline constexpr uint64_t kMaxDefaultSharedBytes = 48 << 10;  // more needs an opt-in attribute
// The push dispatch's receive: each source group's token count, then their exclusive scan (groups + 1 words).
inline uint64_t push_dispatch_shared_bytes(const BufferLayout& l) {
  return (2 * uint64_t(l.num_dp_groups) + 1) * sizeof(uint32_t);
}
// Each warp's view of the senders: one u32 per source group.
inline uint64_t pull_dispatch_shared_bytes(const BufferLayout& l, uint32_t threads) {
  return uint64_t(threads / 32) * l.num_dp_groups * sizeof(uint32_t);
}
// Combine: each local expert's received row count (num_local_experts + 1 words, the last unused) and first row
// plus the total (received_row_starts), then a bit per rank (the pull receive's note of which ranks pushed their
// rows). Offsets in u32 words.
EW_HOST_DEVICE inline uint64_t rank_bit_words(const BufferLayout& l) { return (uint64_t(l.world_size) + 31) / 32; }
EW_HOST_DEVICE inline uint64_t combine_shared_expert_start_word(const BufferLayout& l) {
  return uint64_t(l.num_local_experts) + 1;
}
EW_HOST_DEVICE inline uint64_t combine_shared_rank_bits_word(const BufferLayout& l) {
  return 2 * combine_shared_expert_start_word(l);
}
inline uint64_t combine_shared_bytes(const BufferLayout& l) {
  return (combine_shared_rank_bits_word(l) + rank_bit_words(l)) * sizeof(uint32_t);
}

// Every block of every rank's launch must be resident at once (blocks wait on each other's peers), also when
// ranks share a GPU and their blocks share SMs. Kernels are compiled for blocks of at most kMaxBlockThreads
// threads, two blocks per SM: one block per SM (128 registers a thread) left no room to share, and 2 and 4 ranks
// on one H100 waited out their timeouts. That caps each thread at 64 registers; the copy and reduction loops are
// sized to fit them (ncu showed the reduction spilling to local memory when it kept 16 vectors in flight a lane).
inline constexpr uint32_t kMaxBlockThreads = 512;
inline constexpr uint32_t kMinBlocksPerSm = 2;

// Grid of every launch: the same shape serves dispatch and combine.
struct LaunchShape {
  uint32_t blocks;
  uint32_t threads;
  uint64_t warps() const { return uint64_t(blocks) * (threads / 32); }
};

}  // namespace expertwire::device
