#include "core/ht_layout.h"

#include <algorithm>
#include <limits>

#include "core/error.h"

namespace expertwire {
namespace {

void require_positive(const char* field, int64_t value) {
  EW_REQUIRE(value > 0, "HighThroughputConfig.", field, " must be > 0, got ", value);
}

constexpr int64_t kMaxIndex = int64_t(std::numeric_limits<int32_t>::max());

}  // namespace

int64_t HighThroughputConfig::max_expert_rows() const {
  const int64_t local = num_local_experts();
  return recv_rows() * std::min(experts_per_token, local) + local * (expert_alignment - 1);
}

void HighThroughputConfig::validate() const {
  require_positive("max_num_tokens", max_num_tokens);
  require_positive("num_experts", num_experts);
  require_positive("experts_per_token", experts_per_token);
  require_positive("world_size", world_size);
  require_positive("hidden_dim", hidden_dim);
  require_positive("hidden_dim_bytes", hidden_dim_bytes);
  require_positive("expert_alignment", expert_alignment);
  EW_REQUIRE(world_size <= kMaxHighThroughputRanks,
             "HighThroughputConfig.world_size must be <= ", kMaxHighThroughputRanks,
             " (a token's destination ranks are a 64-bit mask), got ", world_size);
  EW_REQUIRE(rank >= 0 && rank < world_size, "HighThroughputConfig.rank must be in [0, world_size=", world_size,
             "), got ", rank);
  EW_REQUIRE(num_experts % world_size == 0,
             "HighThroughputConfig.num_experts must be divisible by world_size=", world_size, ", got ", num_experts);
  EW_REQUIRE(experts_per_token <= num_experts && experts_per_token <= 32,
             "HighThroughputConfig.experts_per_token must be <= min(num_experts, 32) (a warp's lanes hold a token's "
             "slots), got ",
             experts_per_token);
  EW_REQUIRE(hidden_dim % 8 == 0,
             "HighThroughputConfig.hidden_dim must be a multiple of 8 (rows move as 16-byte "
             "vectors), got ",
             hidden_dim);
  EW_REQUIRE(hidden_dim_bytes % 16 == 0,
             "HighThroughputConfig.hidden_dim_bytes must be a multiple of 16 (rows move as 16-byte vectors), got ",
             hidden_dim_bytes);
  EW_REQUIRE(hidden_dim_scale_bytes >= 0 && hidden_dim_scale_bytes % 4 == 0,
             "HighThroughputConfig.hidden_dim_scale_bytes must be a non-negative multiple of 4 (fp32 scales), got ",
             hidden_dim_scale_bytes);
  EW_REQUIRE(combine_element_bytes == 2 || combine_element_bytes == 4,
             "HighThroughputConfig.combine_element_bytes must be 2 (bf16, fp16) or 4 (float32), got ",
             combine_element_bytes);
  EW_REQUIRE(recv_capacity >= 0,
             "HighThroughputConfig.recv_capacity must be >= 0 (0: max_num_tokens * world_size), got ", recv_capacity);
  for (auto [field, value] : {std::pair{"max_num_tokens", max_num_tokens},
                              {"hidden_dim", hidden_dim},
                              {"hidden_dim_bytes", hidden_dim_bytes},
                              {"expert_alignment", expert_alignment},
                              {"recv_rows() (recv_capacity, or max_num_tokens * world_size)", recv_rows()},
                              {"max_expert_rows()", max_expert_rows()}}) {
    EW_REQUIRE(value <= kMaxIndex, "HighThroughputConfig.", field, " is too large for 32-bit device indexing, got ",
               value);
  }
}

HtLayout make_ht_layout(const HighThroughputConfig& config, bool may_put) {
  HtLayout l{};
  l.rank = uint32_t(config.rank);
  l.world_size = uint32_t(config.world_size);
  l.num_experts = uint32_t(config.num_experts);
  l.num_local_experts = uint32_t(config.num_local_experts());
  l.experts_per_token = uint32_t(config.experts_per_token);
  l.max_num_tokens = uint32_t(config.max_num_tokens);
  l.recv_rows = uint32_t(config.recv_rows());
  l.combine_recv_rows = uint32_t(config.max_num_tokens * std::min(config.experts_per_token, config.world_size));
  l.hidden_dim = uint32_t(config.hidden_dim);
  l.hidden_dim_bytes = uint32_t(config.hidden_dim_bytes);
  l.hidden_dim_scale_bytes = uint32_t(config.hidden_dim_scale_bytes);
  l.combine_element_bytes = uint32_t(config.combine_element_bytes);
  l.expert_alignment = uint32_t(config.expert_alignment);
  l.count_row_words = uint32_t(align_up(l.count_word_x_bytes() + 1, 4));
  l.max_route_blocks = uint32_t((l.max_num_tokens + kRouteBlockTokens - 1) / kRouteBlockTokens);
  l.loss_words = (l.world_size + 31) / 32;
  l.record_bytes = TokenRecordLayout{l.experts_per_token}.bytes();
  l.scale_offset = align_up(l.hidden_dim_bytes, kBufferAlign);
  l.input_row_bytes = l.scale_offset + align_up(l.hidden_dim_scale_bytes, kBufferAlign);
  l.combine_row_bytes = uint64_t(l.hidden_dim) * l.combine_element_bytes;
  l.slot_row_bytes = align_up(uint64_t(l.experts_per_token) * 4, kBufferAlign);

  const uint64_t count_rows_bytes = uint64_t(l.world_size) * l.count_row_words * 4;
  const uint64_t signals_bytes = uint64_t(l.world_size) * 8;
  uint64_t at = 0;
  auto take = [&](uint64_t bytes, const char* what) { return place(at, bytes, kRegionAlign, what); };
  const uint64_t push_rows = may_put ? l.recv_rows : 0;
  l.count_rows_offset = take(count_rows_bytes, "count_rows");
  l.count_out_offset = take(count_rows_bytes, "count_out");
  l.count_arrived_offset = take(signals_bytes, "count_arrived");
  l.data_arrived_offset = take(signals_bytes, "data_arrived");
  l.combine_ready_offset = take(signals_bytes, "combine_ready");
  l.loss_posts_offset = take(uint64_t(l.world_size) * l.loss_words * 8, "loss_posts");
  l.recv_bases_offset = take(signals_bytes, "recv_bases");
  l.token_records_offset = take(checked_mul(l.max_num_tokens, l.record_bytes, "token_records"), "token_records");
  l.input_rows_offset = take(checked_mul(l.max_num_tokens, l.input_row_bytes, "input_rows"), "input_rows");
  l.staging_records_offset = take(checked_mul(push_rows, l.record_bytes, "staging_records"), "staging_records");
  l.staging_rows_offset = take(checked_mul(push_rows, l.input_row_bytes, "staging_rows"), "staging_rows");
  l.combine_rows_offset = take(checked_mul(l.recv_rows, l.combine_row_bytes, "combine_rows"), "combine_rows");
  l.combine_recv_offset =
      take(checked_mul(may_put ? l.combine_recv_rows : 0, l.combine_row_bytes, "combine_recv"), "combine_recv");
  l.combine_weights_offset = take(checked_mul(l.recv_rows, l.slot_row_bytes, "combine_weights"), "combine_weights");
  l.combine_recv_weights_offset = take(
      checked_mul(may_put ? l.combine_recv_rows : 0, l.slot_row_bytes, "combine_recv_weights"), "combine_recv_weights");
  l.symmetric_bytes = place(at, 0, kRegionAlign, "symmetric buffer");
  return l;
}

LayoutSignature ht_layout_signature(const HtLayout& l, bool fault_tolerant) {
  // The words of the low-latency kind's signature, read for this one: no DP groups and no staging rows; the
  // buffer size covers the receive capacity and combine element size.
  return LayoutSignature{{l.num_experts, l.experts_per_token, l.world_size, 1, l.max_num_tokens, l.hidden_dim,
                          l.hidden_dim_bytes, l.hidden_dim_scale_bytes, 0, l.symmetric_bytes,
                          uint64_t(fault_tolerant)}};
}

HtHandleLayout make_ht_handle_layout(const HtLayout& l) {
  HtHandleLayout h{};
  uint64_t at = 0;
  auto take = [&](uint64_t words) {
    const uint64_t offset = align_up(at, 4);  // 16-byte aligned arrays
    at = offset + words;
    return offset;
  };
  const uint64_t k = l.experts_per_token, w = l.world_size, le = l.num_local_experts;
  h.block_counts = take(uint64_t(l.max_route_blocks) * (w + l.num_experts));
  h.slot_rank_row = take(uint64_t(l.max_num_tokens) * k);
  h.slot_expert_row = take(uint64_t(l.max_num_tokens) * k);
  h.slot_dest = take(uint64_t(l.max_num_tokens) * k);
  h.recv_base = take(w + 1);
  h.base_at = take(w);
  h.send_base = take(w + 1);
  h.home_base = take(w);
  h.segment_start = take(le + 1);
  h.tokens_per_expert = take(le);
  h.expert_prefix = take(w * le);
  h.source_m = take(w);
  h.recv_slot_row = take(uint64_t(l.recv_rows) * k);
  h.recv_slot_weight = take(uint64_t(l.recv_rows) * k);
  h.words = align_up(at, 4);
  return h;
}

}  // namespace expertwire
