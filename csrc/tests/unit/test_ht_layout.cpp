// HighThroughputConfig::validate() and make_ht_layout(): every field refused by name, and the regions of the
// symmetric buffer worked out by hand from core/ht_layout.h (regions 256-aligned, rows 16-aligned).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "core/ht_layout.h"
#include "expertwire/high_throughput.h"
#include "tests/unit/config_error.h"

namespace expertwire {
namespace {

using ::testing::HasSubstr;

// 16 experts over 4 ranks, top-4, 64 tokens a rank, fp8 payload of 256 bytes plus 8 bytes of scales.
HighThroughputConfig small_config() {
  HighThroughputConfig c;
  c.max_num_tokens = 64;
  c.num_experts = 16;
  c.experts_per_token = 4;
  c.rank = 1;
  c.world_size = 4;
  c.hidden_dim = 256;
  c.hidden_dim_bytes = 256;
  c.hidden_dim_scale_bytes = 8;
  return c;
}

TEST(HighThroughputConfig, ValidConfigurationPasses) { EXPECT_NO_THROW(small_config().validate()); }

TEST(HighThroughputConfig, EveryBadFieldIsNamed) {
  const std::vector<std::pair<std::function<void(HighThroughputConfig&)>, std::string>> cases = {
      {[](HighThroughputConfig& c) { c.max_num_tokens = 0; }, "max_num_tokens must be > 0"},
      {[](HighThroughputConfig& c) { c.num_experts = 15; }, "num_experts must be divisible by world_size=4"},
      {[](HighThroughputConfig& c) { c.experts_per_token = 33; }, "experts_per_token must be <= min(num_experts, 32)"},
      {[](HighThroughputConfig& c) { c.world_size = 65; }, "world_size must be <= 64"},
      {[](HighThroughputConfig& c) { c.rank = 4; }, "rank must be in [0, world_size=4)"},
      {[](HighThroughputConfig& c) { c.hidden_dim = 100; }, "hidden_dim must be a multiple of 8"},
      {[](HighThroughputConfig& c) { c.hidden_dim_bytes = 100; }, "hidden_dim_bytes must be a multiple of 16"},
      {[](HighThroughputConfig& c) { c.hidden_dim_scale_bytes = 6; }, "hidden_dim_scale_bytes must be a non-negative"},
      {[](HighThroughputConfig& c) { c.combine_element_bytes = 3; }, "combine_element_bytes must be 2"},
      {[](HighThroughputConfig& c) { c.expert_alignment = 0; }, "expert_alignment must be > 0"},
      {[](HighThroughputConfig& c) { c.recv_capacity = -1; }, "recv_capacity must be >= 0"},
      {[](HighThroughputConfig& c) { c.max_num_tokens = int64_t(1) << 30; }, "too large for 32-bit device indexing"},
  };
  for (const auto& [change, message] : cases) {
    HighThroughputConfig c = small_config();
    change(c);
    EXPECT_THAT(config_error_message([&] { c.validate(); }), HasSubstr(message)) << message;
  }
}

TEST(HighThroughputConfig, CapacitiesFollowTheFields) {
  HighThroughputConfig c = small_config();
  EXPECT_EQ(c.recv_rows(), 64 * 4);  // max_num_tokens * world_size
  // Every received token on min(k, local experts) = 4 local experts, plus alignment - 1 rows per segment.
  c.expert_alignment = 128;
  EXPECT_EQ(c.max_expert_rows(), 256 * 4 + 4 * 127);
  c.recv_capacity = 100;
  EXPECT_EQ(c.recv_rows(), 100);
}

TEST(HtLayout, RegionsByHand) {
  const HtLayout pull = make_ht_layout(small_config(), /*may_put=*/false);
  EXPECT_EQ(pull.count_row_words, 12u);     // align4(world 4 + local experts 4 + m 1)
  EXPECT_EQ(pull.record_bytes, 64u);        // 4 arrays of k = 4 words
  EXPECT_EQ(pull.scale_offset, 256u);       // payload, 16-aligned
  EXPECT_EQ(pull.input_row_bytes, 272u);    // + align16(8)
  EXPECT_EQ(pull.combine_row_bytes, 512u);  // 256 bf16
  EXPECT_EQ(pull.count_rows_offset, 0u);
  EXPECT_EQ(pull.count_out_offset, 256u);      // 4 rows x 48 bytes = 192, 256-aligned
  EXPECT_EQ(pull.count_arrived_offset, 512u);  // 192 again
  EXPECT_EQ(pull.data_arrived_offset, 768u);
  EXPECT_EQ(pull.combine_ready_offset, 1024u);
  EXPECT_EQ(pull.loss_words, 1u);  // ceil(4 ranks / 32)
  EXPECT_EQ(pull.loss_posts_offset, 1280u);
  EXPECT_EQ(pull.loss_post_offset(3, 0), 1304u);         // last: 1280 + 3 * 8; ends at 1312
  EXPECT_EQ(pull.recv_bases_offset, 1536u);              // loss posts: 4 ranks x 1 word x 8 bytes = 32, 256-aligned
  EXPECT_EQ(pull.recv_base_offset(3), 1560u);            // last: 1536 + 3 * 8; ends at 1568
  EXPECT_EQ(pull.token_records_offset, 1792u);           // 4 ranks x 8 bytes, 256-aligned
  EXPECT_EQ(pull.input_rows_offset, 1792u + 64u * 64u);  // 64 records of 64 bytes
  EXPECT_EQ(pull.combine_rows_offset, pull.input_rows_offset + 64u * 272u);  // no push regions
  EXPECT_EQ(pull.slot_row_bytes, 16u);                                       // k = 4 floats
  EXPECT_EQ(pull.combine_weights_offset, pull.combine_rows_offset + 256u * 512u);
  EXPECT_EQ(pull.symmetric_bytes, pull.combine_weights_offset + 256u * 16u);
  EXPECT_EQ(pull.combine_recv_rows, 64u * 4u);  // tokens * min(k, world)

  const HtLayout push = make_ht_layout(small_config(), /*may_put=*/true);
  EXPECT_EQ(push.staging_rows_offset, push.staging_records_offset + 256u * 64u);
  EXPECT_EQ(push.combine_rows_offset, push.staging_rows_offset + 256u * 272u);
  EXPECT_EQ(push.combine_weights_offset, push.combine_recv_offset + 256u * 512u);
  EXPECT_EQ(push.combine_recv_weights_offset, push.combine_weights_offset + 256u * 16u);
  EXPECT_EQ(push.symmetric_bytes, push.combine_recv_weights_offset + 256u * 16u);
  EXPECT_NE(ht_layout_signature(pull).words[9], ht_layout_signature(push).words[9]);
  // The last word is the fault-tolerant mode: ranks that differ in it all refuse the layout.
  EXPECT_EQ(ht_layout_signature(pull).words[10], 0u);
  EXPECT_EQ(ht_layout_signature(pull, /*fault_tolerant=*/true).words[10], 1u);
}

TEST(HtLayout, LossPostsOfManyRanks) {
  HighThroughputConfig c = small_config();
  c.world_size = 33;
  c.num_experts = 66;
  const HtLayout l = make_ht_layout(c, false);
  EXPECT_EQ(l.loss_words, 2u);  // ceil(33 / 32)
  // Count rows of align4(33 ranks + 2 local experts + 2) = 40 words: 33 x 160 B = 5280 B, 256-aligned 5376. So
  // count_out at 5376, count_arrived at 10752 (33 x 8 = 264 B), data_arrived at 11264, combine_ready at 11776
  // (ends at 12040), loss_posts at 12288: 33 ranks x 2 words x 8 B = 528 B, ending at 12816.
  EXPECT_EQ(l.count_row_words, 40u);
  EXPECT_EQ(l.combine_ready_offset, 11776u);
  EXPECT_EQ(l.loss_posts_offset, 12288u);
  EXPECT_EQ(l.loss_post_offset(1, 0), 12304u);   // the next rank's first word: 12288 + 2 * 8
  EXPECT_EQ(l.loss_post_offset(32, 1), 12808u);  // last: 12288 + 65 * 8; ends at 12816
  EXPECT_EQ(l.recv_bases_offset, 13056u);        // align256(12816); 33 x 8 = 264 bytes, ending at 13320
  EXPECT_EQ(l.token_records_offset, 13568u);     // align256(13320)
}

TEST(HtHandleLayout, ArraysDoNotOverlap) {
  const HtLayout l = make_ht_layout(small_config(), false);
  const HtHandleLayout h = make_ht_handle_layout(l);
  EXPECT_EQ(h.block_counts, 0u);
  EXPECT_EQ(h.slot_rank_row, 20u);  // 1 route block x (4 ranks + 16 experts)
  EXPECT_EQ(h.slot_expert_row, 20u + 256u);
  EXPECT_EQ(h.slot_dest, 20u + 512u);
  EXPECT_GE(h.words, h.recv_slot_weight + 256u * 4u);
}

}  // namespace
}  // namespace expertwire
