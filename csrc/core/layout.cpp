#include "core/layout.h"

#include <algorithm>

#include "core/error.h"

namespace expertwire {

uint64_t checked_mul(uint64_t a, uint64_t b, const char* what) {
  uint64_t out = 0;
  if (__builtin_mul_overflow(a, b, &out)) {
    EW_THROW(ConfigError, "buffer size of ", what, " overflows 64 bits (", a, " * ", b, ")");
  }
  return out;
}

uint64_t checked_add(uint64_t a, uint64_t b, const char* what) {
  uint64_t out = 0;
  if (__builtin_add_overflow(a, b, &out)) {
    EW_THROW(ConfigError, "buffer size of ", what, " overflows 64 bits (", a, " + ", b, ")");
  }
  return out;
}

uint64_t place(uint64_t& cursor, uint64_t bytes, uint64_t alignment, const char* what) {
  const uint64_t offset = checked_add(cursor, alignment - 1, what) / alignment * alignment;
  cursor = checked_add(offset, bytes, what);
  return offset;
}

BufferLayout make_buffer_layout(const AllToAllConfig& config, uint64_t staging_slots) {
  config.validate();
  BufferLayout l{};
  l.num_experts = uint32_t(config.num_experts);
  l.num_local_experts = uint32_t(config.num_local_experts());
  l.experts_per_token = uint32_t(config.experts_per_token);
  l.world_size = uint32_t(config.world_size);
  l.dp_size = uint32_t(config.dp_size);
  l.num_dp_groups = uint32_t(config.num_dp_groups());
  l.max_num_tokens = uint32_t(config.max_num_tokens);
  l.hidden_dim = uint32_t(config.hidden_dim);
  l.hidden_dim_bytes = uint32_t(config.hidden_dim_bytes);
  l.hidden_dim_scale_bytes = uint32_t(config.hidden_dim_scale_bytes);
  l.max_recv_tokens = uint32_t(checked_mul(l.max_num_tokens, l.num_dp_groups, "max_recv_tokens"));

  l.token_header_bytes = align_up(sizeof(uint32_t) * (1 + uint64_t(l.experts_per_token)), kBufferAlign);
  l.dispatch_token_bytes = l.token_header_bytes + l.hidden_dim_bytes + align_up(l.hidden_dim_scale_bytes, kBufferAlign);
  l.combine_row_bytes = checked_mul(l.hidden_dim, kCombineElementBytes, "combine row");
  l.staging_row_bytes = std::max(l.dispatch_token_bytes, l.combine_row_bytes);

  const uint64_t dispatch_slots = checked_mul(l.num_dp_groups, l.max_num_tokens, "dispatch_recv");
  uint64_t cursor = 0;
  l.dispatch_recv_offset = place(cursor, checked_mul(dispatch_slots, l.dispatch_token_bytes, "dispatch_recv"),
                                 kRegionAlign, "dispatch_recv");
  l.combine_recv_offset = place(cursor,
                                checked_mul(checked_mul(l.max_num_tokens, l.experts_per_token, "combine_recv"),
                                            l.combine_row_bytes, "combine_recv"),
                                kRegionAlign, "combine_recv");
  l.dispatch_counts_offset = place(cursor, uint64_t(l.world_size) * sizeof(uint64_t), kRegionAlign, "dispatch_counts");
  l.combine_done_offset = place(cursor, uint64_t(l.world_size) * sizeof(uint64_t), kRegionAlign, "combine_done");
  l.loss_words = (l.world_size + 31) / 32;
  l.loss_posts_offset =
      place(cursor, uint64_t(l.world_size) * l.loss_words * sizeof(uint64_t), kRegionAlign, "loss_posts");
  l.staging_slots = staging_slots;
  l.staging_offset = place(cursor, checked_mul(staging_slots, l.staging_row_bytes, "staging"), kRegionAlign, "staging");
  l.send_rows_offset =
      place(cursor, checked_mul(l.max_num_tokens, l.dispatch_token_bytes, "send_rows"), kRegionAlign, "send_rows");
  l.send_announce_offset = place(cursor, sizeof(uint64_t), kRegionAlign, "send_announce");
  l.send_stamps_offset = place(cursor, uint64_t(l.max_num_tokens) * sizeof(uint64_t), kRegionAlign, "send_stamps");
  l.combine_slots_offset =
      place(cursor,
            checked_mul(checked_mul(uint64_t(l.num_dp_groups) * l.max_num_tokens, l.experts_per_token, "combine_slots"),
                        sizeof(uint32_t), "combine_slots"),
            kRegionAlign, "combine_slots");
  l.expert_outputs_offset = place(cursor,
                                  checked_mul(checked_mul(l.num_local_experts, l.max_recv_tokens, "expert_outputs"),
                                              l.combine_row_bytes, "expert_outputs"),
                                  kRegionAlign, "expert_outputs");
  l.symmetric_bytes = place(cursor, 0, kRegionAlign, "symmetric buffer");

  uint64_t ws = 0;
  l.send_counts_offset = place(ws, uint64_t(l.world_size) * sizeof(uint32_t), kRegionAlign, "send_counts");
  l.recv_counts_offset = place(ws, uint64_t(l.num_local_experts) * sizeof(int32_t), kRegionAlign, "recv_counts");
  l.routes_offset =
      place(ws, checked_mul(uint64_t(l.num_local_experts) * l.max_recv_tokens, kTokenRouteBytes, "routes"),
            kRegionAlign, "routes");
  l.phase_counters_offset = place(ws, kNumPhaseCounters * sizeof(uint32_t), kRegionAlign, "phase_counters");
  l.pull_state_offset =
      place(ws, checked_mul(l.pull_state_words(), sizeof(uint32_t), "pull_state"), kRegionAlign, "pull_state");
  l.dispatch_epoch_offset = place(ws, sizeof(uint32_t), kRegionAlign, "dispatch_epoch");
  l.active_ranks_offset = place(ws, uint64_t(l.world_size) * sizeof(int32_t), kRegionAlign, "active_ranks");
  l.liveness_offset = place(ws, kLivenessWordsBytes, kRegionAlign, "liveness");
  l.settled_counts_offset = place(ws, uint64_t(l.world_size) * sizeof(uint64_t), kRegionAlign, "settled_counts");
  l.workspace_bytes = place(ws, 0, kRegionAlign, "workspace");
  return l;
}

void require_fits_symmetric_heap(uint64_t symmetric_bytes, uint64_t heap_bytes) {
  // NVSHMEM keeps part of the heap for itself; ask for a little headroom so the error comes from us.
  constexpr uint64_t kHeapReserve = 64ull << 20;
  const uint64_t needed = checked_add(symmetric_bytes, kHeapReserve, "symmetric heap");
  if (needed > heap_bytes) {
    EW_THROW(ConfigError, "symmetric heap too small: expertwire needs ", symmetric_bytes,
             " bytes of symmetric memory per rank (+", kHeapReserve, " reserve = ", needed,
             " bytes) but NVSHMEM_SYMMETRIC_SIZE gives ", heap_bytes,
             " bytes; set NVSHMEM_SYMMETRIC_SIZE>=", (needed >> 20) + ((needed & ((1ull << 20) - 1)) != 0), "M");
  }
}

LayoutSignature layout_signature(const BufferLayout& l, bool fault_tolerant) {
  return LayoutSignature{{l.num_experts, l.experts_per_token, l.world_size, l.dp_size, l.max_num_tokens, l.hidden_dim,
                          l.hidden_dim_bytes, l.hidden_dim_scale_bytes, l.staging_slots, l.symmetric_bytes,
                          uint64_t(fault_tolerant)}};
}

void require_same_layout(const std::vector<LayoutSignature>& by_rank) {
  for (size_t rank = 1; rank < by_rank.size(); ++rank) {
    for (int w = 0; w < LayoutSignature::kWords; ++w) {
      EW_REQUIRE(by_rank[rank].words[w] == by_rank[0].words[w], "ranks disagree on ", LayoutSignature::kNames[w],
                 ": rank 0 has ", by_rank[0].words[w], ", rank ", rank, " has ", by_rank[rank].words[w],
                 "; every rank must construct its all-to-all alike");
    }
  }
}

}  // namespace expertwire
