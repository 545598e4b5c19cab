// make_buffer_layout() and require_fits_symmetric_heap(). Every expected number is worked out by hand from
// the layout described in core/layout.h (regions 256-aligned, rows 16-aligned); the arithmetic sits next to
// each literal so a mismatch can be checked against the header rather than against layout.cpp.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"
#include "core/layout.h"
#include "device/wire_protocol.h"
#include "expertwire/config.h"
#include "expertwire/strided.h"
#include "tests/unit/config_error.h"

namespace expertwire {
namespace {

using ::testing::HasSubstr;

// 8 experts over 4 ranks in 2 DP groups of 2: 2 local experts, 2 groups, fp8 payload of 32 bytes plus 8 bytes
// of scales.
AllToAllConfig small_config() {
  AllToAllConfig config;
  config.max_num_tokens = 4;
  config.num_experts = 8;
  config.experts_per_token = 3;
  config.rank = 1;
  config.world_size = 4;
  config.dp_size = 2;
  config.hidden_dim = 32;
  config.hidden_dim_bytes = 32;
  config.hidden_dim_scale_bytes = 8;
  return config;
}

// A bf16 payload (2 bytes per element) with a wide header: the dispatch token is larger than a combine row,
// so staging rows take the dispatch size.
AllToAllConfig bf16_config() {
  AllToAllConfig config;
  config.max_num_tokens = 2;
  config.num_experts = 6;
  config.experts_per_token = 5;
  config.rank = 2;
  config.world_size = 3;
  config.dp_size = 1;
  config.hidden_dim = 16;
  config.hidden_dim_bytes = 32;
  config.hidden_dim_scale_bytes = 4;
  return config;
}

AllToAllConfig deepseek_v3_config() {
  AllToAllConfig config;
  config.max_num_tokens = 128;
  config.num_experts = 256;
  config.experts_per_token = 8;
  config.rank = 0;
  config.world_size = 8;
  config.dp_size = 1;
  config.hidden_dim = 7168;
  config.hidden_dim_bytes = 7168;
  config.hidden_dim_scale_bytes = 224;
  return config;
}

struct Region {
  const char* name;
  uint64_t offset;
  uint64_t bytes;
};

// Regions must be 256-aligned, in ascending order without overlap, and inside `total`.
void expect_disjoint_regions(std::vector<Region> regions, uint64_t total) {
  std::sort(regions.begin(), regions.end(), [](const Region& a, const Region& b) { return a.offset < b.offset; });
  for (size_t i = 0; i < regions.size(); ++i) {
    EXPECT_EQ(regions[i].offset % kRegionAlign, 0u) << regions[i].name;
    const uint64_t end = regions[i].offset + regions[i].bytes;
    if (i + 1 < regions.size()) {
      EXPECT_LE(end, regions[i + 1].offset) << regions[i].name << " overlaps " << regions[i + 1].name;
    }
    EXPECT_LE(end, total) << regions[i].name << " runs past the end";
  }
}

void expect_layout_regions_disjoint(const BufferLayout& l) {
  expect_disjoint_regions(
      {
          {"dispatch_recv", l.dispatch_recv_offset,
           uint64_t(l.num_dp_groups) * l.max_num_tokens * l.dispatch_token_bytes},
          {"combine_recv", l.combine_recv_offset,
           uint64_t(l.max_num_tokens) * l.experts_per_token * l.combine_row_bytes},
          {"dispatch_counts", l.dispatch_counts_offset, uint64_t(l.world_size) * 8},
          {"combine_done", l.combine_done_offset, uint64_t(l.world_size) * 8},
          {"staging", l.staging_offset, l.staging_slots * l.staging_row_bytes},
          {"send_rows", l.send_rows_offset, uint64_t(l.max_num_tokens) * l.dispatch_token_bytes},
          {"send_announce", l.send_announce_offset, 8},
          {"send_stamps", l.send_stamps_offset, uint64_t(l.max_num_tokens) * 8},
          {"combine_slots", l.combine_slots_offset,
           uint64_t(l.num_dp_groups) * l.max_num_tokens * l.experts_per_token * 4},
          {"expert_outputs", l.expert_outputs_offset,
           uint64_t(l.num_local_experts) * l.max_recv_tokens * l.combine_row_bytes},
          {"loss_posts", l.loss_posts_offset, uint64_t(l.world_size) * l.loss_words * 8},
      },
      l.symmetric_bytes);
  expect_disjoint_regions(
      {
          {"send_counts", l.send_counts_offset, uint64_t(l.world_size) * 4},
          {"recv_counts", l.recv_counts_offset, uint64_t(l.num_local_experts) * 4},
          {"routes", l.routes_offset, uint64_t(l.num_local_experts) * l.max_recv_tokens * 8},
          {"phase_counters", l.phase_counters_offset, uint64_t(kNumPhaseCounters) * 4},
          {"pull_state", l.pull_state_offset, l.pull_state_words() * 4},
          {"dispatch_epoch", l.dispatch_epoch_offset, 4},
          {"active_ranks", l.active_ranks_offset, uint64_t(l.world_size) * 4},
          {"liveness", l.liveness_offset, kLivenessWordsBytes},
          {"settled_counts", l.settled_counts_offset, uint64_t(l.world_size) * 8},
      },
      l.workspace_bytes);
}

TEST(Layout, SmallConfigShape) {
  const BufferLayout l = make_buffer_layout(small_config(), 5);
  EXPECT_EQ(l.num_experts, 8u);
  EXPECT_EQ(l.num_local_experts, 2u);  // 8 / 4
  EXPECT_EQ(l.experts_per_token, 3u);
  EXPECT_EQ(l.world_size, 4u);
  EXPECT_EQ(l.dp_size, 2u);
  EXPECT_EQ(l.num_dp_groups, 2u);  // 4 / 2
  EXPECT_EQ(l.max_num_tokens, 4u);
  EXPECT_EQ(l.max_recv_tokens, 8u);  // 4 tokens * 2 groups
  EXPECT_EQ(l.hidden_dim, 32u);
  EXPECT_EQ(l.hidden_dim_bytes, 32u);
  EXPECT_EQ(l.hidden_dim_scale_bytes, 8u);
}

TEST(Layout, SmallConfigStrides) {
  const BufferLayout l = make_buffer_layout(small_config(), 5);
  EXPECT_EQ(l.token_header_bytes, 16u);         // align16(4 + 4 * 3 = 16) = 16
  EXPECT_EQ(l.dispatch_token_bytes, 64u);       // 16 header + 32 payload + align16(8) = 16
  EXPECT_EQ(l.combine_row_bytes, 64u);          // 32 * 2
  EXPECT_EQ(l.staging_row_bytes, 64u);          // max(64, 64)
  EXPECT_EQ(l.payload_offset_in_token(), 16u);  // right after the header
  EXPECT_EQ(l.scale_offset_in_token(), 48u);    // 16 + 32
}

TEST(Layout, SmallConfigSymmetricRegions) {
  const BufferLayout l = make_buffer_layout(small_config(), 5);
  // dispatch_recv: 2 groups * 4 tokens = 8 slots * 64 B = 512 B, at 0 -> cursor 512
  EXPECT_EQ(l.dispatch_recv_offset, 0u);
  // combine_recv: align256(512) = 512; 4 tokens * 3 k * 64 B = 768 B -> cursor 1280
  EXPECT_EQ(l.combine_recv_offset, 512u);
  // dispatch_counts: align256(1280) = 1280 (5 * 256); 4 ranks * 8 B = 32 B -> cursor 1312
  EXPECT_EQ(l.dispatch_counts_offset, 1280u);
  // combine_done: align256(1312) = 1536 (6 * 256); 4 * 8 B = 32 B -> cursor 1568
  EXPECT_EQ(l.combine_done_offset, 1536u);
  // loss_posts: ceil(4 ranks / 32) = 1 word a rank; align256(1568) = 1792 (7 * 256); 4 * 1 * 8 B = 32 B
  // -> cursor 1824
  EXPECT_EQ(l.loss_words, 1u);
  EXPECT_EQ(l.loss_posts_offset, 1792u);
  // staging: align256(1824) = 2048 (8 * 256); 5 slots * 64 B = 320 B -> cursor 2368
  EXPECT_EQ(l.staging_offset, 2048u);
  EXPECT_EQ(l.staging_slots, 5u);
  // send_rows: align256(2368) = 2560 (10 * 256); 4 tokens * 64 B = 256 B -> cursor 2816
  EXPECT_EQ(l.send_rows_offset, 2560u);
  // send_announce: align256(2816) = 2816 (11 * 256); 8 B -> cursor 2824
  EXPECT_EQ(l.send_announce_offset, 2816u);
  // send_stamps: align256(2824) = 3072 (12 * 256); 4 tokens * 8 B = 32 B -> cursor 3104
  EXPECT_EQ(l.send_stamps_offset, 3072u);
  // combine_slots: align256(3104) = 3328 (13 * 256); 2 groups * 4 tokens * 3 k * 4 B = 96 B -> cursor 3424
  EXPECT_EQ(l.combine_slots_offset, 3328u);
  // expert_outputs: align256(3424) = 3584 (14 * 256); 2 local experts * 8 rows * 64 B = 1024 B -> cursor 4608
  EXPECT_EQ(l.expert_outputs_offset, 3584u);
  // 4608 = 18 * 256 is already aligned
  EXPECT_EQ(l.symmetric_bytes, 4608u);
}

TEST(Layout, SmallConfigWorkspace) {
  const BufferLayout l = make_buffer_layout(small_config(), 5);
  // send_counts: 4 ranks * 4 B = 16 B at 0 -> 16
  EXPECT_EQ(l.send_counts_offset, 0u);
  // recv_counts: align256(16) = 256; 2 * 4 B = 8 B -> 264
  EXPECT_EQ(l.recv_counts_offset, 256u);
  // routes: align256(264) = 512; 2 local experts * 8 rows * 8 B = 128 B -> 640
  EXPECT_EQ(l.routes_offset, 512u);
  // phase_counters: align256(640) = 768; 4 * 4 B = 16 B -> 784
  EXPECT_EQ(l.phase_counters_offset, 768u);
  // pull_state: align256(784) = 1024; (2 local experts + 2 groups + 1) * 4 B = 20 B -> 1044
  EXPECT_EQ(l.pull_state_offset, 1024u);
  // dispatch_epoch: align256(1044) = 1280; 4 B -> 1284
  EXPECT_EQ(l.dispatch_epoch_offset, 1280u);
  // active_ranks: align256(1284) = 1536; 4 ranks * 4 B = 16 B -> 1552
  EXPECT_EQ(l.active_ranks_offset, 1536u);
  // liveness: align256(1552) = 1792; 16 B -> 1808
  EXPECT_EQ(l.liveness_offset, 1792u);
  // settled_counts: align256(1808) = 2048; 4 ranks * 8 B = 32 B -> 2080
  EXPECT_EQ(l.settled_counts_offset, 2048u);
  // align256(2080) = 2304
  EXPECT_EQ(l.workspace_bytes, 2304u);
}

TEST(Layout, SmallConfigAccessors) {
  const BufferLayout l = make_buffer_layout(small_config(), 5);
  // Slot index of (group, slot) is group * 4 + slot; stride 64 B, base 0.
  EXPECT_EQ(l.dispatch_token_offset(0, 0), 0u);
  EXPECT_EQ(l.dispatch_token_offset(0, 1), 64u);   // 1 * 64
  EXPECT_EQ(l.dispatch_token_offset(1, 0), 256u);  // (1 * 4 + 0 = 4) * 64
  EXPECT_EQ(l.dispatch_token_offset(1, 3), 448u);  // last slot: (1 * 4 + 3 = 7) * 64
  EXPECT_EQ(l.dispatch_token_offset(1, 3) + l.dispatch_token_bytes, l.combine_recv_offset);  // 448 + 64

  // Row (token, k) is token * 3 + k; stride 64 B, base 512.
  EXPECT_EQ(l.combine_row_offset(0, 0), 512u);
  EXPECT_EQ(l.combine_row_offset(1, 0), 704u);       // 512 + 3 * 64
  EXPECT_EQ(l.combine_row_offset(3, 2), 1216u);      // last row: 512 + (3 * 3 + 2 = 11) * 64 = 512 + 704
  EXPECT_EQ(1216u + 64u, l.dispatch_counts_offset);  // the last row ends where the counts start

  // Count per source rank, 8 B each, base 1280.
  EXPECT_EQ(l.dispatch_count_offset(0), 1280u);
  EXPECT_EQ(l.dispatch_count_offset(2), 1296u);  // 1280 + 2 * 8
  EXPECT_EQ(l.dispatch_count_offset(3), 1304u);  // last: 1280 + 3 * 8; ends at 1312

  // Flag per source rank, 8 B each, base 1536.
  EXPECT_EQ(l.combine_done_offset_of(0), 1536u);
  EXPECT_EQ(l.combine_done_offset_of(3), 1560u);  // last: 1536 + 3 * 8; ends at 1568 <= 1792 (loss_posts)

  // Loss post word (source rank, word) is rank * 1 + word; 8 B each, base 1792.
  EXPECT_EQ(l.loss_post_offset(0, 0), 1792u);
  EXPECT_EQ(l.loss_post_offset(3, 0), 1816u);  // last: 1792 + 3 * 8; ends at 1824 <= 2048 (staging)

  // Staging row per slot, 64 B each, base 2048.
  EXPECT_EQ(l.staging_row_offset(0), 2048u);
  EXPECT_EQ(l.staging_row_offset(4), 2304u);  // last: 2048 + 4 * 64; ends at 2368 <= 2560 (send_rows)

  // Send row per token, 64 B each, base 2560.
  EXPECT_EQ(l.send_row_offset(0), 2560u);
  EXPECT_EQ(l.send_row_offset(3), 2752u);          // last: 2560 + 3 * 64
  EXPECT_EQ(2752u + 64u, l.send_announce_offset);  // the last row ends where the announcement starts

  // Stamp per token, 8 B each, base 3072.
  EXPECT_EQ(l.send_stamp_offset(0), 3072u);
  EXPECT_EQ(l.send_stamp_offset(3), 3096u);  // last: 3072 + 3 * 8; ends at 3104 <= 3328

  // Slot (group, token, k) is (group * 4 + token) * 3 + k; 4 B each, base 3328.
  EXPECT_EQ(l.combine_slot_offset(0, 0, 0), 3328u);
  EXPECT_EQ(l.combine_slot_offset(0, 1, 2), 3348u);  // 3328 + (1 * 3 + 2 = 5) * 4
  EXPECT_EQ(l.combine_slot_offset(1, 3, 2), 3420u);  // last: 3328 + ((1 * 4 + 3) * 3 + 2 = 23) * 4; ends at 3424

  // Expert output (local expert, row) is expert * 8 + row; 64 B each, base 3584.
  EXPECT_EQ(l.expert_output_offset(0, 0), 3584u);
  EXPECT_EQ(l.expert_output_offset(1, 0), 4096u);  // 3584 + 8 * 64
  EXPECT_EQ(l.expert_output_offset(1, 7), 4544u);  // last: 3584 + 15 * 64; ends at 4608 = symmetric_bytes

  // Route (expert, row) is expert * 8 + row; 8 B each, base 512.
  EXPECT_EQ(l.route_offset(0, 0), 512u);
  EXPECT_EQ(l.route_offset(0, 5), 552u);  // 512 + 5 * 8
  EXPECT_EQ(l.route_offset(1, 7), 632u);  // last: 512 + (1 * 8 + 7 = 15) * 8 = 512 + 120; ends at 640
}

TEST(Layout, SmallConfigRegionsDisjoint) { expect_layout_regions_disjoint(make_buffer_layout(small_config(), 5)); }

// A loss post holds 32 ranks a word: 32 ranks take one word, 33 two, 64 two, 65 three.
TEST(Layout, LossPostsTake32RanksAWord) {
  for (const auto& [world, words] : {std::pair{32, 1u}, std::pair{33, 2u}, std::pair{64, 2u}, std::pair{65, 3u}}) {
    AllToAllConfig config = small_config();
    config.world_size = world;
    config.rank = 0;
    config.dp_size = 1;
    config.num_experts = 2 * world;  // 2 local experts
    const BufferLayout l = make_buffer_layout(config, 5);
    EXPECT_EQ(l.loss_words, words) << world << " ranks";
    expect_layout_regions_disjoint(l);
  }
  // 33 ranks in 33 DP groups, otherwise small_config():
  AllToAllConfig config = small_config();
  config.world_size = 33;
  config.rank = 0;
  config.dp_size = 1;
  config.num_experts = 66;
  const BufferLayout l = make_buffer_layout(config, 5);
  // dispatch_recv: 33 groups * 4 tokens * 64 B = 8448 (33 * 256) -> 8448
  // combine_recv: at 8448; 4 * 3 * 64 B = 768 -> 9216 (36 * 256)
  // dispatch_counts: at 9216; 33 * 8 B = 264 -> 9480
  EXPECT_EQ(l.dispatch_counts_offset, 9216u);
  // combine_done: align256(9480) = 9728 (38 * 256); 264 B -> 9992
  EXPECT_EQ(l.combine_done_offset, 9728u);
  // loss_posts: align256(9992) = 10240 (40 * 256); 33 ranks * 2 words * 8 B = 528 B -> 10768
  EXPECT_EQ(l.loss_posts_offset, 10240u);
  EXPECT_EQ(l.loss_post_offset(0, 1), 10248u);   // 10240 + 1 * 8
  EXPECT_EQ(l.loss_post_offset(1, 0), 10256u);   // 10240 + 2 * 8: the next rank's post
  EXPECT_EQ(l.loss_post_offset(32, 1), 10760u);  // last: 10240 + (32 * 2 + 1 = 65) * 8; ends at 10768
  // staging: align256(10768) = 11008 (43 * 256)
  EXPECT_EQ(l.staging_offset, 11008u);
  // Workspace: send_counts 33 * 4 = 132 at 0; recv_counts at 256 (+8); routes at 512 (2 * 132 rows * 8 = 2112
  // -> 2624); phase_counters at align256(2624) = 2816 (+16 = 2832); pull_state at 3072 ((2 + 33 + 1) * 4 = 144
  // -> 3216); dispatch_epoch at 3328 (+4 = 3332); active_ranks at 3584 (33 * 4 = 132 -> 3716); liveness at
  // 3840 (+16 = 3856); settled_counts at 4096 (33 * 8 = 264 -> 4360); total align256(4360) = 4608
  EXPECT_EQ(l.phase_counters_offset, 2816u);
  EXPECT_EQ(l.pull_state_offset, 3072u);
  EXPECT_EQ(l.dispatch_epoch_offset, 3328u);
  EXPECT_EQ(l.active_ranks_offset, 3584u);
  EXPECT_EQ(l.liveness_offset, 3840u);
  EXPECT_EQ(l.settled_counts_offset, 4096u);
  EXPECT_EQ(l.workspace_bytes, 4608u);
}

TEST(Layout, Bf16ConfigDispatchTokenWiderThanCombineRow) {
  const BufferLayout l = make_buffer_layout(bf16_config(), 3);
  EXPECT_EQ(l.num_local_experts, 2u);         // 6 / 3
  EXPECT_EQ(l.num_dp_groups, 3u);             // 3 / 1
  EXPECT_EQ(l.max_recv_tokens, 6u);           // 2 * 3
  EXPECT_EQ(l.token_header_bytes, 32u);       // align16(4 + 4 * 5 = 24) = 32
  EXPECT_EQ(l.dispatch_token_bytes, 80u);     // 32 + 32 + align16(4) = 16
  EXPECT_EQ(l.combine_row_bytes, 32u);        // 16 * 2
  EXPECT_EQ(l.staging_row_bytes, 80u);        // max(80, 32)
  EXPECT_EQ(l.scale_offset_in_token(), 64u);  // 32 + 32

  // dispatch_recv: 3 groups * 2 tokens = 6 slots * 80 B = 480 B -> cursor 480
  EXPECT_EQ(l.dispatch_recv_offset, 0u);
  // combine_recv: align256(480) = 512; 2 * 5 * 32 B = 320 B -> 832
  EXPECT_EQ(l.combine_recv_offset, 512u);
  // dispatch_counts: align256(832) = 1024; 3 ranks * 8 B = 24 B -> 1048
  EXPECT_EQ(l.dispatch_counts_offset, 1024u);
  // combine_done: align256(1048) = 1280; 3 * 8 B = 24 B -> 1304
  EXPECT_EQ(l.combine_done_offset, 1280u);
  // loss_posts: ceil(3 / 32) = 1 word a rank; align256(1304) = 1536; 3 * 1 * 8 B = 24 B -> 1560
  EXPECT_EQ(l.loss_words, 1u);
  EXPECT_EQ(l.loss_posts_offset, 1536u);
  // staging: align256(1560) = 1792; 3 * 80 B = 240 B -> 2032
  EXPECT_EQ(l.staging_offset, 1792u);
  // send_rows: align256(2032) = 2048; 2 tokens * 80 B = 160 B -> 2208
  EXPECT_EQ(l.send_rows_offset, 2048u);
  // send_announce: align256(2208) = 2304; 8 B -> 2312
  EXPECT_EQ(l.send_announce_offset, 2304u);
  // send_stamps: align256(2312) = 2560; 2 tokens * 8 B = 16 B -> 2576
  EXPECT_EQ(l.send_stamps_offset, 2560u);
  // combine_slots: align256(2576) = 2816; 3 groups * 2 tokens * 5 k * 4 B = 120 B -> 2936
  EXPECT_EQ(l.combine_slots_offset, 2816u);
  // expert_outputs: align256(2936) = 3072; 2 local experts * 6 rows * 32 B = 384 B -> 3456
  EXPECT_EQ(l.expert_outputs_offset, 3072u);
  // align256(3456) = 3584
  EXPECT_EQ(l.symmetric_bytes, 3584u);

  // send 3 * 4 = 12 at 0; recv at 256 (+8 = 264); routes at 512 (2 * 6 * 8 = 96 -> 608);
  // phase at 768 (4 * 4 = 16 -> 784); pull_state at align256(784) = 1024 ((2 + 3 + 1) * 4 = 24 -> 1048);
  // dispatch_epoch at align256(1048) = 1280 (+4 = 1284); active_ranks at align256(1284) = 1536 (3 * 4 = 12
  // -> 1548); liveness at align256(1548) = 1792 (+16 = 1808); total align256(1808) = 2048
  EXPECT_EQ(l.send_counts_offset, 0u);
  EXPECT_EQ(l.recv_counts_offset, 256u);
  EXPECT_EQ(l.routes_offset, 512u);
  EXPECT_EQ(l.phase_counters_offset, 768u);
  EXPECT_EQ(l.pull_state_offset, 1024u);
  EXPECT_EQ(l.dispatch_epoch_offset, 1280u);
  EXPECT_EQ(l.active_ranks_offset, 1536u);
  EXPECT_EQ(l.liveness_offset, 1792u);
  EXPECT_EQ(l.settled_counts_offset, 2048u);
  EXPECT_EQ(l.workspace_bytes, 2304u);

  EXPECT_EQ(l.dispatch_token_offset(2, 1), 400u);    // last slot: (2 * 2 + 1 = 5) * 80; ends at 480
  EXPECT_EQ(l.combine_row_offset(1, 4), 800u);       // last row: 512 + (1 * 5 + 4 = 9) * 32; ends at 832
  EXPECT_EQ(l.dispatch_count_offset(2), 1040u);      // last: 1024 + 2 * 8
  EXPECT_EQ(l.combine_done_offset_of(2), 1296u);     // last: 1280 + 2 * 8
  EXPECT_EQ(l.loss_post_offset(2, 0), 1552u);        // last: 1536 + 2 * 8; ends at 1560
  EXPECT_EQ(l.staging_row_offset(2), 1952u);         // last: 1792 + 2 * 80; ends at 2032
  EXPECT_EQ(l.send_row_offset(0), 2048u);            // first: the region base
  EXPECT_EQ(l.send_row_offset(1), 2128u);            // last: 2048 + 1 * 80; ends at 2208
  EXPECT_EQ(l.send_stamp_offset(0), 2560u);          // first: the region base
  EXPECT_EQ(l.send_stamp_offset(1), 2568u);          // last: 2560 + 1 * 8; ends at 2576 <= 2816
  EXPECT_EQ(l.combine_slot_offset(2, 1, 4), 2932u);  // last: 2816 + ((2 * 2 + 1) * 5 + 4 = 29) * 4; ends at 2936
  EXPECT_EQ(l.expert_output_offset(1, 5), 3424u);    // last: 3072 + (1 * 6 + 5 = 11) * 32; ends at 3456
  EXPECT_EQ(l.route_offset(1, 5), 600u);             // last: 512 + (1 * 6 + 5 = 11) * 8

  expect_layout_regions_disjoint(l);
}

TEST(Layout, DeepSeekV3Config) {
  const BufferLayout l = make_buffer_layout(deepseek_v3_config(), 64);
  EXPECT_EQ(l.num_local_experts, 32u);  // 256 / 8
  EXPECT_EQ(l.num_dp_groups, 8u);       // 8 / 1
  EXPECT_EQ(l.max_recv_tokens, 1024u);  // 128 * 8

  EXPECT_EQ(l.token_header_bytes, 48u);         // align16(4 + 4 * 8 = 36) = 48
  EXPECT_EQ(l.dispatch_token_bytes, 7440u);     // 48 + 7168 + align16(224) = 224 (14 * 16)
  EXPECT_EQ(l.combine_row_bytes, 14336u);       // 7168 * 2
  EXPECT_EQ(l.staging_row_bytes, 14336u);       // max(7440, 14336)
  EXPECT_EQ(l.scale_offset_in_token(), 7216u);  // 48 + 7168

  // dispatch_recv: 8 groups * 128 tokens = 1024 slots * 7440 B = 7,618,560 B (= 4 * 7440 * 256)
  EXPECT_EQ(l.dispatch_recv_offset, 0u);
  // combine_recv: 7,618,560 is 256-aligned; 128 * 8 * 14336 = 14,680,064 B -> 22,298,624
  EXPECT_EQ(l.combine_recv_offset, 7618560u);
  // dispatch_counts: 22,298,624 is 256-aligned (14,680,064 = 1024 * 14336); 8 ranks * 8 B = 64 B -> 22,298,688
  EXPECT_EQ(l.dispatch_counts_offset, 22298624u);
  // combine_done: align256(22,298,688) = 22,298,624 + 256 = 22,298,880; 8 * 8 = 64 B -> 22,298,944
  EXPECT_EQ(l.combine_done_offset, 22298880u);
  // loss_posts: ceil(8 / 32) = 1 word a rank; align256(22,298,944) = 22,298,880 + 256 = 22,299,136;
  // 8 * 1 * 8 = 64 B -> 22,299,200
  EXPECT_EQ(l.loss_words, 1u);
  EXPECT_EQ(l.loss_posts_offset, 22299136u);
  // staging: align256(22,299,200) = 22,299,136 + 256 = 22,299,392; 64 * 14336 = 917,504 B -> 23,216,896
  EXPECT_EQ(l.staging_offset, 22299392u);
  // send_rows: 917,504 = 3584 * 256, so 23,216,896 is already aligned; 128 * 7440 = 952,320 B
  // (= 3720 * 256) -> 24,169,216
  EXPECT_EQ(l.send_rows_offset, 23216896u);
  // send_announce: 24,169,216 is 256-aligned; 8 B -> 24,169,224
  EXPECT_EQ(l.send_announce_offset, 24169216u);
  // send_stamps: align256(24,169,224) = 24,169,216 + 256 = 24,169,472; 128 tokens * 8 = 1024 B -> 24,170,496
  EXPECT_EQ(l.send_stamps_offset, 24169472u);
  // combine_slots: 24,170,496 = 24,169,472 + 4 * 256 is already aligned; 8 groups * 128 tokens * 8 k * 4 B
  // = 32,768 B -> 24,203,264
  EXPECT_EQ(l.combine_slots_offset, 24170496u);
  // expert_outputs: 24,203,264 is aligned (32,768 = 128 * 256); 32 * 1024 rows * 14336 B = 469,762,048 B
  // -> 493,965,312
  EXPECT_EQ(l.expert_outputs_offset, 24203264u);
  // 469,762,048 = 1,835,008 * 256, so the end is already aligned
  EXPECT_EQ(l.symmetric_bytes, 493965312u);

  // send_counts: 8 ranks * 4 = 32 at 0; recv_counts: align256(32) = 256, 32 * 4 = 128 -> 384;
  // routes: align256(384) = 512, 32 * 1024 * 8 = 262,144 -> 262,656 (= 1026 * 256);
  // phase_counters: at 262,656, 4 * 4 = 16 -> 262,672;
  // pull_state: align256(262,672) = 262,912 (1027 * 256), (32 + 8 + 1) * 4 = 164 -> 263,076;
  // dispatch_epoch: align256(263,076) = 263,168 (1028 * 256), 4 -> 263,172;
  // active_ranks: align256(263,172) = 263,424 (1029 * 256), 8 * 4 = 32 -> 263,456;
  // liveness: align256(263,456) = 263,680 (1030 * 256), 16 -> 263,696;
  // total: align256(263,696) = 263,936 (1031 * 256)
  EXPECT_EQ(l.send_counts_offset, 0u);
  EXPECT_EQ(l.recv_counts_offset, 256u);
  EXPECT_EQ(l.routes_offset, 512u);
  EXPECT_EQ(l.phase_counters_offset, 262656u);
  EXPECT_EQ(l.pull_state_offset, 262912u);
  EXPECT_EQ(l.dispatch_epoch_offset, 263168u);
  EXPECT_EQ(l.active_ranks_offset, 263424u);
  EXPECT_EQ(l.liveness_offset, 263680u);
  EXPECT_EQ(l.settled_counts_offset, 263936u);
  EXPECT_EQ(l.workspace_bytes, 264192u);

  // Last slot: 7 * 128 + 127 = 1023; 1023 * 7440 = 7,611,120 (+7440 = end)
  EXPECT_EQ(l.dispatch_token_offset(7, 127), 7611120u);
  // Second group, first slot: 128 slots * 7440 = 952,320
  EXPECT_EQ(l.dispatch_token_offset(1, 0), 952320u);
  // Last row: 127 * 8 + 7 = 1023; 7,618,560 + 1023 * 14336 (= 14,665,728) = 22,284,288
  EXPECT_EQ(l.combine_row_offset(127, 7), 22284288u);
  // Last count: 22,298,624 + 7 * 8 = 22,298,680
  EXPECT_EQ(l.dispatch_count_offset(7), 22298680u);
  EXPECT_EQ(l.combine_done_offset_of(7), 22298936u);  // 22,298,880 + 7 * 8
  EXPECT_EQ(l.loss_post_offset(7, 0), 22299192u);     // last: 22,299,136 + 7 * 8; ends at 22,299,200
  // Last staging row: 22,299,392 + 63 * 14336 (= 903,168) = 23,202,560; ends at 23,216,896
  EXPECT_EQ(l.staging_row_offset(63), 23202560u);
  EXPECT_EQ(l.send_row_offset(0), 23216896u);  // first send row: the region base, right after staging
  // Last send row: 23,216,896 + 127 * 7440 (= 944,880) = 24,161,776; ends at 24,169,216
  EXPECT_EQ(l.send_row_offset(127), 24161776u);
  EXPECT_EQ(l.send_stamp_offset(0), 24169472u);
  // Last stamp: 24,169,472 + 127 * 8 (= 1016) = 24,170,488; ends at 24,170,496, where combine_slots starts
  EXPECT_EQ(l.send_stamp_offset(127), 24170488u);
  // Last slot: (7 * 128 + 127) * 8 + 7 = 8191; 24,170,496 + 8191 * 4 = 24,203,260; ends at 24,203,264
  EXPECT_EQ(l.combine_slot_offset(7, 127, 7), 24203260u);
  // Last expert output: 31 * 1024 + 1023 = 32767; 24,203,264 + 32767 * 14336 (= 469,747,712) = 493,950,976;
  // ends at 493,965,312 = symmetric_bytes
  EXPECT_EQ(l.expert_output_offset(31, 1023), 493950976u);
  // Last route: 31 * 1024 + 1023 = 32767; 512 + 32767 * 8 = 512 + 262,136 = 262,648; ends at 262,656
  EXPECT_EQ(l.route_offset(31, 1023), 262648u);

  expect_layout_regions_disjoint(l);
}

TEST(Layout, ValidatesConfig) {
  AllToAllConfig config = small_config();
  config.rank = 4;
  const std::string message = config_error_message([&] { make_buffer_layout(config, 5); });
  EXPECT_THAT(message, HasSubstr("AllToAllConfig.rank"));
  EXPECT_THAT(message, HasSubstr("got 4"));
}

TEST(LayoutOverflow, StagingSlotsTimesRowBytes) {
  // UINT64_MAX * 64 B wraps
  const uint64_t slots = std::numeric_limits<uint64_t>::max();
  const std::string message = config_error_message([&] { make_buffer_layout(small_config(), slots); });
  EXPECT_THAT(message, HasSubstr("staging"));
  EXPECT_THAT(message, HasSubstr("overflows"));
}

TEST(LayoutOverflow, StagingEndPastAddressSpace) {
  // (2^64 - 1) / 64 slots * 64 B = 2^64 - 64 B, which fits, but starting at offset 2048 it ends past 2^64.
  const uint64_t slots = std::numeric_limits<uint64_t>::max() / 64;
  const std::string message = config_error_message([&] { make_buffer_layout(small_config(), slots); });
  EXPECT_THAT(message, HasSubstr("staging"));
  EXPECT_THAT(message, HasSubstr("overflows"));
}

// small_config() puts staging at 2048 (after loss_posts [1792, 1824)) with 64-byte rows, and five fixed-size
// regions follow it: send_rows (4 tokens * 64 B = 256 B), send_announce (8 B), send_stamps (4 tokens * 8 B = 32 B),
// combine_slots (2 groups * 4 tokens * 3 k * 4 B = 96 B) and expert_outputs (2 experts * 8 rows * 64 B = 1024 B).
// With slots = 2^58 - n:
//   staging ends at          E = 2048 + 64 * (2^58 - n) = 2^64 - (64 * n - 2048) = 2^64 - 64 * (n - 32)
//   send_rows                [S, S + 256) with S = align256(E)        (computing E + 255 must not pass 2^64)
//   send_announce            [S + 256, S + 264)                       (S + 256 is already aligned)
//   send_stamps              [S + 512, S + 544)                       (align256(S + 264) = S + 512)
//   combine_slots            [S + 768, S + 864)                       (align256(S + 544) = S + 768)
//   expert_outputs           [S + 1024, S + 2048)                     (align256(S + 864) = S + 1024)
//   symmetric_bytes          = S + 2048, already aligned
// so, by n:
//   n <= 32     staging ends at or past 2^64                                   -> "staging" overflows
//   n = 33..35  E = 2^64 - 64, - 128, - 192: align256(E) reaches 2^64          -> "send_rows" overflows
//   n = 36..39  E = 2^64 - 256 .. - 448, S = 2^64 - 256: send_rows ends at 2^64 -> "send_rows" overflows
//   n = 40..43  S = 2^64 - 512: send_announce ends at 2^64 - 248; aligning the start of send_stamps
//               reaches 2^64                                                   -> "send_stamps" overflows
//   n = 44..47  S = 2^64 - 768: send_stamps [2^64 - 256, 2^64 - 224) fits; aligning the start of
//               combine_slots reaches 2^64                                     -> "combine_slots" overflows
//   n = 48..51  S = 2^64 - 1024: combine_slots [2^64 - 256, 2^64 - 160) fits; aligning the start of
//               expert_outputs reaches 2^64                                    -> "expert_outputs" overflows
//   n = 52..67  S = 2^64 - 1280 .. - 2048: expert_outputs starts below 2^64 and ends past it, exactly at 2^64
//               for S = 2^64 - 2048 (n = 64..67)                               -> "expert_outputs" overflows
//   n = 68      E = S = 2^64 - 2304: symmetric_bytes = 2^64 - 256, the largest aligned size: it fits.
// The rows n = 33..67: a region after staging is the first whose placement passes 2^64.
struct RegionOverflowCase {
  uint64_t n;          // staging_slots = 2^58 - n
  const char* region;  // the region named in the error
};

class LayoutRegionAfterStagingOverflow : public ::testing::TestWithParam<RegionOverflowCase> {};

TEST_P(LayoutRegionAfterStagingOverflow, ThrowsNamingTheRegion) {
  const uint64_t slots = (uint64_t(1) << 58) - GetParam().n;
  const std::string message = config_error_message([&] { make_buffer_layout(small_config(), slots); });
  EXPECT_THAT(message, HasSubstr(GetParam().region));
  EXPECT_THAT(message, HasSubstr("overflows"));
}

INSTANTIATE_TEST_SUITE_P(
    SmallConfig, LayoutRegionAfterStagingOverflow,
    ::testing::Values(RegionOverflowCase{33, "send_rows"}, RegionOverflowCase{34, "send_rows"},
                      RegionOverflowCase{35, "send_rows"},  // aligning the start of send_rows wraps
                      RegionOverflowCase{36, "send_rows"},  // send_rows ends exactly at 2^64
                      RegionOverflowCase{39, "send_rows"},
                      RegionOverflowCase{40, "send_stamps"},  // aligning its start wraps
                      RegionOverflowCase{43, "send_stamps"},
                      RegionOverflowCase{44, "combine_slots"},  // aligning its start wraps to zero
                      RegionOverflowCase{47, "combine_slots"},
                      RegionOverflowCase{48, "expert_outputs"},  // aligning its start wraps to zero
                      RegionOverflowCase{51, "expert_outputs"},
                      RegionOverflowCase{52, "expert_outputs"},  // starts below 2^64, ends past it
                      RegionOverflowCase{64, "expert_outputs"},  // ends exactly at 2^64
                      RegionOverflowCase{67, "expert_outputs"}),
    [](const ::testing::TestParamInfo<RegionOverflowCase>& info) {
      return "slots_2pow58_minus_" + std::to_string(info.param.n);
    });

TEST(LayoutOverflow, StagingEndsExactlyAt2To64) {
  // 2^58 - 32 slots: 2048 + 64 * (2^58 - 32) = 2^64 + 2048 - 2048 = 2^64, one past the largest offset.
  const uint64_t slots = (uint64_t(1) << 58) - 32;
  const std::string message = config_error_message([&] { make_buffer_layout(small_config(), slots); });
  EXPECT_THAT(message, HasSubstr("staging"));
  EXPECT_THAT(message, HasSubstr("overflows"));
}

TEST(LayoutOverflow, LargestAlignedEndStillFits) {
  // 2^58 - 68 slots: staging ends at 2048 + 64 * (2^58 - 68) = 2^64 - 2304 (aligned); send_rows at 2^64 - 2304
  // (256 B -> 2^64 - 2048); send_announce at 2^64 - 2048 (8 B); send_stamps at align256 = 2^64 - 1792
  // (32 B); combine_slots at 2^64 - 1536 (96 B); expert_outputs at 2^64 - 1280 (1024 B -> 2^64 - 256), the
  // largest 256-aligned size, so the layout is valid. One slot more (n = 67) wraps (see above).
  const uint64_t slots = (uint64_t(1) << 58) - 68;
  const BufferLayout l = make_buffer_layout(small_config(), slots);
  EXPECT_EQ(l.loss_posts_offset, 1792u);
  EXPECT_EQ(l.staging_offset, 2048u);
  EXPECT_EQ(l.send_rows_offset, 18446744073709549312ull);       // 2^64 - 2304
  EXPECT_EQ(l.send_announce_offset, 18446744073709549568ull);   // 2^64 - 2048
  EXPECT_EQ(l.send_stamps_offset, 18446744073709549824ull);     // 2^64 - 1792
  EXPECT_EQ(l.send_stamp_offset(3), 18446744073709549848ull);   // 2^64 - 1792 + 24
  EXPECT_EQ(l.combine_slots_offset, 18446744073709550080ull);   // 2^64 - 1536
  EXPECT_EQ(l.expert_outputs_offset, 18446744073709550336ull);  // 2^64 - 1280
  EXPECT_EQ(l.symmetric_bytes, 18446744073709551360ull);        // 2^64 - 256
}

// small_config() with 64 experts (16 local experts): expert_outputs is 16 * 8 * 64 = 8192 bytes, a multiple of
// 256, so the end of the whole layout lands on 256-byte boundaries such as 2^64.
AllToAllConfig many_experts_config() {
  AllToAllConfig config = small_config();
  config.num_experts = 64;
  return config;
}

TEST(LayoutOverflow, ManyExpertsConfigRegions) {
  const BufferLayout l = make_buffer_layout(many_experts_config(), 5);
  EXPECT_EQ(l.num_local_experts, 16u);     // 64 / 4
  EXPECT_EQ(l.num_dp_groups, 2u);          // 4 / 2
  EXPECT_EQ(l.dispatch_token_bytes, 64u);  // as small_config()
  EXPECT_EQ(l.staging_row_bytes, 64u);
  // dispatch_recv: 2 groups * 4 tokens = 8 slots * 64 B = 512 B -> 512
  // combine_recv: at 512; 4 * 3 * 64 B = 768 B -> 1280
  // dispatch_counts: align256(1280) = 1280 (5 * 256); 4 ranks * 8 B = 32 B -> 1312
  // combine_done: align256(1312) = 1536 (6 * 256); 4 * 8 B = 32 B -> 1568
  // loss_posts: align256(1568) = 1792 (7 * 256); 4 ranks * 1 word * 8 B = 32 B -> 1824
  // staging: align256(1824) = 2048 (8 * 256); 5 * 64 B = 320 B -> 2368
  // send_rows: align256(2368) = 2560 (10 * 256); 4 * 64 B = 256 B -> 2816
  // send_announce: at 2816 (11 * 256); 8 B -> 2824
  // send_stamps: align256(2824) = 3072 (12 * 256); 4 * 8 B = 32 B -> 3104
  // combine_slots: align256(3104) = 3328 (13 * 256); 2 * 4 * 3 * 4 B = 96 B -> 3424
  // expert_outputs: align256(3424) = 3584 (14 * 256); 16 * 8 * 64 B = 8192 B -> 11776 (46 * 256)
  EXPECT_EQ(l.dispatch_recv_offset, 0u);
  EXPECT_EQ(l.combine_recv_offset, 512u);
  EXPECT_EQ(l.dispatch_counts_offset, 1280u);
  EXPECT_EQ(l.combine_done_offset, 1536u);
  EXPECT_EQ(l.loss_posts_offset, 1792u);
  EXPECT_EQ(l.staging_offset, 2048u);
  EXPECT_EQ(l.send_rows_offset, 2560u);
  EXPECT_EQ(l.send_announce_offset, 2816u);
  EXPECT_EQ(l.send_stamps_offset, 3072u);
  EXPECT_EQ(l.combine_slots_offset, 3328u);
  EXPECT_EQ(l.expert_outputs_offset, 3584u);
  EXPECT_EQ(l.symmetric_bytes, 11776u);
  EXPECT_EQ(l.send_row_offset(3), 2752u);            // last: 2560 + 3 * 64; ends at 2816
  EXPECT_EQ(l.send_stamp_offset(3), 3096u);          // last: 3072 + 3 * 8; ends at 3104
  EXPECT_EQ(l.expert_output_offset(15, 7), 11712u);  // last: 3584 + 127 * 64; ends at 11776 = symmetric_bytes
  // Workspace: send 4 * 4 = 16 at 0; recv at 256 (16 * 4 = 64 -> 320); routes at align256(320) = 512
  // (16 * 8 rows * 8 = 1024 -> 1536); phase at 1536 (4 * 4 = 16 -> 1552); pull_state at align256(1552) = 1792
  // ((16 + 2 + 1) * 4 = 76 -> 1868); dispatch_epoch at align256(1868) = 2048 (+4 = 2052); active_ranks at
  // align256(2052) = 2304 (4 * 4 = 16 -> 2320); liveness at align256(2320) = 2560 (+16 = 2576); total
  // align256(2576) = 2816
  EXPECT_EQ(l.recv_counts_offset, 256u);
  EXPECT_EQ(l.routes_offset, 512u);
  EXPECT_EQ(l.phase_counters_offset, 1536u);
  EXPECT_EQ(l.pull_state_offset, 1792u);
  EXPECT_EQ(l.dispatch_epoch_offset, 2048u);
  EXPECT_EQ(l.active_ranks_offset, 2304u);
  EXPECT_EQ(l.liveness_offset, 2560u);
  EXPECT_EQ(l.settled_counts_offset, 2816u);
  EXPECT_EQ(l.workspace_bytes, 3072u);
  expect_layout_regions_disjoint(l);
}

TEST(LayoutOverflow, LayoutEndsExactlyAt2To64) {
  // many_experts_config(): staging at 2048, rows of 64 B; send_rows [S, S + 256), send_announce
  // [S + 256, S + 264), send_stamps [S + 512, S + 544), combine_slots [S + 768, S + 864), expert_outputs
  // [S + 1024, S + 9216) with S = align256(2048 + 64 * slots).
  // 2^58 - 176 slots: 2048 + 64 * (2^58 - 176) = 2^64 - 9216 (11264 = 176 * 64), aligned, so S = 2^64 - 9216 and
  // expert_outputs ends exactly at 2^64, one past the largest offset.
  const uint64_t slots = (uint64_t(1) << 58) - 176;
  const std::string message = config_error_message([&] { make_buffer_layout(many_experts_config(), slots); });
  EXPECT_THAT(message, HasSubstr("expert_outputs"));
  EXPECT_THAT(message, HasSubstr("overflows"));
}

TEST(LayoutOverflow, ManyExpertsLargestEndStillFits) {
  // 2^58 - 180 slots: staging ends at 2048 + 64 * (2^58 - 180) = 2^64 - 9472 (11520 = 180 * 64); send_rows at
  // 2^64 - 9472, send_announce at 2^64 - 9216, send_stamps at 2^64 - 8960, combine_slots at 2^64 - 8704,
  // expert_outputs at 2^64 - 8448 ending at 2^64 - 256: already aligned, the largest valid size.
  const BufferLayout l = make_buffer_layout(many_experts_config(), (uint64_t(1) << 58) - 180);
  EXPECT_EQ(l.staging_offset, 2048u);
  EXPECT_EQ(l.send_rows_offset, 18446744073709542144ull);       // 2^64 - 9472
  EXPECT_EQ(l.send_announce_offset, 18446744073709542400ull);   // 2^64 - 9216
  EXPECT_EQ(l.send_stamps_offset, 18446744073709542656ull);     // 2^64 - 8960
  EXPECT_EQ(l.combine_slots_offset, 18446744073709542912ull);   // 2^64 - 8704
  EXPECT_EQ(l.expert_outputs_offset, 18446744073709543168ull);  // 2^64 - 8448
  EXPECT_EQ(l.symmetric_bytes, 18446744073709551360ull);        // 2^64 - 256
}

TEST(LayoutOverflow, RowsPerLocalExpertFromConfig) {
  // (2^31 - 1) tokens * 8 DP groups does not fit the u32 max_recv_tokens; the layout must not truncate it.
  AllToAllConfig config = deepseek_v3_config();
  config.max_num_tokens = 2147483647;
  config.num_experts = 8;
  const std::string message = config_error_message([&] { make_buffer_layout(config, 1); });
  EXPECT_THAT(message, HasSubstr("max_num_tokens * world_size / dp_size"));
  EXPECT_THAT(message, HasSubstr("got 17179869176"));  // (2^31 - 1) * 8
}

TEST(LayoutOverflow, ExpertOutputsFromConfig) {
  // Fields at their limits: (2^31 - 1) local experts * 255 rows ~ 2^39 rows, times a ~2^32-byte row (2 bytes an
  // element), is far past 2^64; every region before it fits (dispatch_recv: 1 group * 255 tokens of ~2^31 bytes).
  // (255 tokens: the most whose combine work items, 255 * 2^23 chunks of hidden 2^31 - 8, fit.)
  AllToAllConfig config;
  config.max_num_tokens = 255;
  config.num_experts = 2147483647;
  config.experts_per_token = 1;
  config.rank = 0;
  config.world_size = 1;
  config.dp_size = 1;
  config.hidden_dim = 2147483640;        // largest multiple of 8 below 2^31
  config.hidden_dim_bytes = 2147483632;  // largest multiple of 16 below 2^31
  config.hidden_dim_scale_bytes = 0;
  const std::string message = config_error_message([&] { make_buffer_layout(config, 1); });
  EXPECT_THAT(message, HasSubstr("expert_outputs"));
  EXPECT_THAT(message, HasSubstr("overflows"));
}

TEST(SymmetricHeap, FitsInLargeHeap) {
  const BufferLayout l = make_buffer_layout(deepseek_v3_config(), 64);
  EXPECT_NO_THROW(require_fits_symmetric_heap(l.symmetric_bytes, 1ull << 30));  // 1 GiB
  // 493,965,312 + 64 MiB (67,108,864) reserve = 561,074,176: exactly enough.
  EXPECT_NO_THROW(require_fits_symmetric_heap(l.symmetric_bytes, 561074176ull));
}

TEST(SymmetricHeap, OneByteShort) {
  const BufferLayout l = make_buffer_layout(deepseek_v3_config(), 64);
  const std::string message =
      config_error_message([&] { require_fits_symmetric_heap(l.symmetric_bytes, 561074175ull); });
  EXPECT_THAT(message, HasSubstr("561074176"));
}

TEST(SymmetricHeap, SmallHeapNamesNeededBytesAndVariable) {
  const BufferLayout l = make_buffer_layout(deepseek_v3_config(), 64);
  const std::string message =
      config_error_message([&] { require_fits_symmetric_heap(l.symmetric_bytes, 256ull << 20); });
  EXPECT_THAT(message, HasSubstr("493965312"));  // symmetric bytes
  EXPECT_THAT(message, HasSubstr("561074176"));  // + 64 MiB reserve
  EXPECT_THAT(message, HasSubstr("268435456"));  // the heap it was given: 256 * 2^20
  EXPECT_THAT(message, HasSubstr("NVSHMEM_SYMMETRIC_SIZE"));
  // 561,074,176 = 535 * 2^20 (560,988,160) + 86,016, so ceil(561,074,176 / 2^20) = 536
  EXPECT_THAT(message, HasSubstr("NVSHMEM_SYMMETRIC_SIZE>=536M"));
}

TEST(SymmetricHeap, NeededBytesOverflowIsAnError) {
  // symmetric_bytes = 2^64 - 256 (see LargestAlignedEndStillFits); + 64 MiB reserve passes 2^64. Unchecked, the
  // sum wrapped to 64 MiB - 256 and even a small heap appeared to fit.
  const BufferLayout l = make_buffer_layout(small_config(), (uint64_t(1) << 58) - 68);
  ASSERT_EQ(l.symmetric_bytes, 18446744073709551360ull);
  for (const uint64_t heap_bytes : {uint64_t(1) << 30, std::numeric_limits<uint64_t>::max()}) {
    const std::string message =
        config_error_message([&] { require_fits_symmetric_heap(l.symmetric_bytes, heap_bytes); });
    EXPECT_THAT(message, HasSubstr("symmetric heap"));
    EXPECT_THAT(message, HasSubstr("overflows"));
  }
}

TEST(SymmetricHeap, NeededJustBelow2To64) {
  // 2^58 - 2^20 - 68 slots: staging ends at 2048 + 64 * slots = 2^64 - 2^26 - 2304 (256-aligned), which is
  // S in the table above LayoutRegionAfterStagingOverflow; symmetric_bytes = S + 2048 = 2^64 - 2^26 - 256, so
  // needed = + 64 MiB (2^26) = 2^64 - 256 fits.
  const BufferLayout l = make_buffer_layout(small_config(), (uint64_t(1) << 58) - (uint64_t(1) << 20) - 68);
  ASSERT_EQ(l.symmetric_bytes, 18446744073642442496ull);  // 2^64 - 2^26 - 256
  EXPECT_NO_THROW(require_fits_symmetric_heap(l.symmetric_bytes, std::numeric_limits<uint64_t>::max()));
  const std::string message = config_error_message([&] { require_fits_symmetric_heap(l.symmetric_bytes, 1ull << 30); });
  EXPECT_THAT(message, HasSubstr("18446744073709551360"));  // needed = 2^64 - 256
  // ceil((2^64 - 256) / 2^20) = 2^44; rounding up by adding 2^20 - 1 first would wrap and print 0M.
  EXPECT_THAT(message, HasSubstr("NVSHMEM_SYMMETRIC_SIZE>=17592186044416M"));
}

// Shares added in any order: complete exactly when the last of `blocks` arrives, block 0's payload intact.
TEST(ArrivalSignal, CompleteOnlyWhenEveryBlockArrived) {
  for (const uint32_t blocks : {1u, 2u, 14u, ArrivalSignal::kMaxBlocks}) {
    for (const uint32_t first : {0u, blocks - 1}) {  // block 0 first, or last
      const uint32_t payload = ArrivalSignal::kMaxPayload;
      uint64_t value = 0;
      EXPECT_FALSE(ArrivalSignal::complete(value));
      for (uint32_t arrived = 1; arrived <= blocks; ++arrived) {
        const uint32_t block = first == 0 ? arrived - 1 : blocks - arrived;
        value += ArrivalSignal::share(block, blocks, payload);
        EXPECT_EQ(ArrivalSignal::complete(value), arrived == blocks) << "blocks " << blocks << " arrived " << arrived;
      }
      EXPECT_TRUE(ArrivalSignal::complete(value));
      EXPECT_EQ(ArrivalSignal::payload(value), payload);
      EXPECT_EQ(value >> 40, blocks);
    }
  }
  // Block 0 alone of two: its count field says 2, one has arrived.
  EXPECT_FALSE(ArrivalSignal::complete(ArrivalSignal::share(0, 2, 5)));
  EXPECT_EQ(ArrivalSignal::payload(ArrivalSignal::share(0, 2, 5)), 5u);
  EXPECT_EQ(ArrivalSignal::payload(ArrivalSignal::share(1, 2, 5)), 0u);
}

// Combine's dynamic shared memory: each local expert's row count and first row (received_row_starts, 2 *
// (num_local + 1) words), then a bit per rank (which ranks pushed their rows), rounded up to whole words.
TEST(KernelSharedMemory, CombineHoldsExpertStartsThenARankBitmap) {
  const BufferLayout small = make_buffer_layout(small_config(), 5);  // 2 local experts, 4 ranks
  EXPECT_EQ(CombineShared::expert_start_word(small), 3u);            // after 2 counts and a spare word
  EXPECT_EQ(CombineShared::rank_bits_word(small), 6u);               // 2 * (2 + 1)
  EXPECT_EQ(CombineShared::rank_bit_words(small), 1u);
  EXPECT_EQ(CombineShared::bytes(small), 28u);  // (6 + 1) * 4
  for (const auto& [world, words] : {std::pair{32, 1u}, std::pair{33, 2u}, std::pair{64, 2u}, std::pair{65, 3u}}) {
    AllToAllConfig config = small_config();
    config.world_size = world;
    config.dp_size = 1;
    config.num_experts = 2 * world;  // still 2 local experts
    const BufferLayout l = make_buffer_layout(config, 5);
    EXPECT_EQ(CombineShared::rank_bit_words(l), words) << world << " ranks";
    EXPECT_EQ(CombineShared::bytes(l), (6u + words) * 4u) << world << " ranks";
  }
}

// Scale tensors of DeepSeek-V3's shape (56 fp32 words a token), 2 local experts of 32 rows each.
TEST(Strided3D, ContiguousIsRowMajor) {
  const Strided3D<float> s = contiguous_matrices<float>(nullptr, 32, 224);
  EXPECT_EQ(s.matrix_stride, 7168u);  // 32 * 224
  EXPECT_EQ(s.row_stride, 224u);
  EXPECT_EQ(s.element_stride, 4u);
  EXPECT_EQ(s.offset(1, 2, 3), 7168u + 448u + 12u);
}

TEST(Strided3D, ColumnMajorAndPaddedRows) {
  const Strided3D<float> column_major{nullptr, 32 * 224, 4, 32 * 4};  // each expert [56 words][32 rows]
  EXPECT_EQ(column_major.offset(0, 5, 0), 20u);
  EXPECT_EQ(column_major.offset(0, 5, 1), 128u + 20u);
  EXPECT_EQ(column_major.offset(1, 0, 55), 7168u + 55u * 128u);
  const Strided3D<float> padded =
      contiguous_matrices<float>(nullptr, 32, 7168 * 4);  // vLLM per-token: hidden_dim words
  EXPECT_EQ(padded.offset(0, 1, 0), 28672u);
  EXPECT_EQ(padded.offset(1, 0, 3), 32u * 28672u + 12u);
}

TEST(Strided2D, AtStepsInBytes) {
  alignas(16) uint8_t bytes[64] = {};
  const Strided2D<const uint8_t> rows{bytes, 24, 1};  // rows further apart than their bytes
  EXPECT_EQ(rows.at(2, 5), bytes + 53);
  const Strided2D<float> words{reinterpret_cast<float*>(bytes), 4, 16};  // column-major words
  EXPECT_EQ(reinterpret_cast<uint8_t*>(words.at(1, 2)), bytes + 36);
  EXPECT_EQ(contiguous_rows<const uint8_t>(bytes, 16).row_stride, 16u);
}

// The push dispatch's counts: count + 1, so that 0 reads as "not arrived".
TEST(DispatchCount, ZeroTokensStillArrive) {
  EXPECT_FALSE(DispatchCount::arrived(0));
  for (const uint32_t tokens : {0u, 1u, 4096u}) {
    EXPECT_TRUE(DispatchCount::arrived(DispatchCount::encode(tokens)));
    EXPECT_EQ(DispatchCount::tokens(DispatchCount::encode(tokens)), tokens);
  }
}

// What a combine arrival says: where the rank's rows are, and the 16-bit type they travel as.
TEST(CombineArrival, CarriesWhereAndTheRowType) {
  for (const CombineRowsAt at : {kRowsInOwnerBuffer, kRowsPushed}) {
    for (const ScalarType type : {ScalarType::kBFloat16, ScalarType::kFloat16}) {
      const uint32_t payload = CombineArrival::payload(at, type);
      EXPECT_LE(payload, ArrivalSignal::kMaxPayload);
      EXPECT_EQ(CombineArrival::rows_at(payload), at);
      EXPECT_EQ(CombineArrival::row_type(payload), type);
      EXPECT_EQ(ArrivalSignal::payload(ArrivalSignal::share(0, 3, payload)), payload);
    }
  }
}

// A pull-receive warp's view of a sender: unheard (0), heard with its count, then all taken.
TEST(SenderView, HeardCountsAndAllTaken) {
  EXPECT_FALSE(SenderView::is_heard(0));
  for (const uint32_t tokens : {0u, 7u, 0xfffffeu}) {
    const uint32_t heard = SenderView::heard(tokens);
    EXPECT_TRUE(SenderView::is_heard(heard));
    EXPECT_FALSE(SenderView::all_taken(heard));
    EXPECT_EQ(SenderView::tokens(heard), tokens);
    EXPECT_TRUE(SenderView::all_taken(heard | SenderView::kAllTaken));
    EXPECT_EQ(SenderView::tokens(heard | SenderView::kAllTaken), tokens);
  }
}

// Epochs run 1, 2, ..., 2^32 - 1, then 1 again: never 0, which is what fresh stamps and announcements hold, and
// never the same twice in a row across the wrap (a counter that wrapped at 2^32 instead gave epoch 1 twice).
TEST(DispatchEpoch, NeverZeroAndNeverRepeatsAcrossTheWrap) {
  EXPECT_EQ(DispatchEpoch::of(0), 1u);  // a fresh workspace: the first dispatch
  EXPECT_EQ(DispatchEpoch::of(1), 2u);
  EXPECT_EQ(DispatchEpoch::of(0xfffffffeu), 0xffffffffu);
  EXPECT_EQ(DispatchEpoch::advance(0), 1u);
  EXPECT_EQ(DispatchEpoch::advance(0xfffffffdu), 0xfffffffeu);
  EXPECT_EQ(DispatchEpoch::advance(0xfffffffeu), 0u);  // the period closes: the next epoch is 1 again
  uint32_t finished = 0xffffff00u;
  for (int dispatch = 0; dispatch < 512; ++dispatch) {
    const uint32_t next = DispatchEpoch::advance(finished);
    EXPECT_NE(DispatchEpoch::of(finished), 0u) << finished;
    EXPECT_NE(DispatchEpoch::of(next), DispatchEpoch::of(finished)) << finished;
    finished = next;
  }
  // (2^32 - 256) + 512 = 2^32 + 256, and 2^32 = 1 modulo 2^32 - 1: 257.
  EXPECT_EQ(finished, 257u);
}

TEST(DispatchEpoch, AnnouncementCarriesEpochAndTokens) {
  for (const uint32_t epoch : {1u, 2u, 0xffffffffu}) {
    for (const uint32_t m : {0u, 1u, 128u, 16777214u}) {
      const uint64_t value = DispatchEpoch::announcement(epoch, m);
      EXPECT_EQ(DispatchEpoch::announced_epoch(value), epoch);
      EXPECT_EQ(DispatchEpoch::announced_tokens(value), m);
      EXPECT_NE(value, 0u);  // never what a fresh buffer holds
    }
  }
  EXPECT_NE(DispatchEpoch::announced_epoch(0), DispatchEpoch::of(0));  // a fresh announcement is no dispatch's
}

TEST(LayoutSignature, HoldsTheFieldsPeersDependOn) {
  const BufferLayout l = make_buffer_layout(small_config(), 5);
  const LayoutSignature signature = layout_signature(l, true);
  const uint64_t expected[LayoutSignature::kWords] = {8, 3, 4, 2, 4, 32, 32, 8, 5, 4608, 1};
  for (int w = 0; w < LayoutSignature::kWords; ++w) EXPECT_EQ(signature.words[w], expected[w]) << w;
}

TEST(LayoutSignature, AgreeingRanksPass) {
  const LayoutSignature signature = layout_signature(make_buffer_layout(small_config(), 5));
  require_same_layout({signature, signature, signature, signature});
  require_same_layout({signature});
}

TEST(LayoutSignature, TheFirstDifferingFieldOfTheFirstDifferingRankIsNamed) {
  AllToAllConfig padded_scales = small_config();
  padded_scales.hidden_dim_scale_bytes = 4;  // pads to the same 16-byte token tail as 8
  const LayoutSignature good = layout_signature(make_buffer_layout(small_config(), 5));
  const LayoutSignature scales = layout_signature(make_buffer_layout(padded_scales, 5));
  const LayoutSignature grid = layout_signature(make_buffer_layout(small_config(), 6));
  EXPECT_EQ(scales.words[9], good.words[9]);  // the same buffer size: only the signature tells them apart
  EXPECT_EQ(config_error_message([&] {
              require_same_layout({good, good, scales, grid});
            }),
            "ranks disagree on hidden_dim_scale_bytes: rank 0 has 8, rank 2 has 4; every rank must construct its "
            "all-to-all alike");
  EXPECT_THAT(config_error_message([&] {
                require_same_layout({good, grid});
              }),
              HasSubstr("ranks disagree on staging rows (one per warp of the launch"));
}

}  // namespace
}  // namespace expertwire
