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

// A bf16 payload (2 bytes per element) with a wide header: the dispatch token (80 B) is larger than a combine
// row (32 B), so a stride mixed up between the two shows.
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
          {"send_rows", l.send_rows_offset, uint64_t(l.max_num_tokens) * l.dispatch_token_bytes},
          {"send_announce", l.send_announce_offset, 8},
          {"send_stamps", l.send_stamps_offset, uint64_t(l.max_num_tokens) * 8},
          {"combine_slots", l.combine_slots_offset,
           uint64_t(l.num_dp_groups) * l.max_num_tokens * l.experts_per_token * 4},
          {"expert_outputs", l.expert_outputs_offset,
           uint64_t(l.num_local_experts) * l.max_recv_tokens * l.combine_row_bytes},
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
      },
      l.workspace_bytes);
}

TEST(Layout, SmallConfigShape) {
  const BufferLayout l = make_buffer_layout(small_config());
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
  const BufferLayout l = make_buffer_layout(small_config());
  EXPECT_EQ(l.token_header_bytes, 16u);         // align16(4 + 4 * 3 = 16) = 16
  EXPECT_EQ(l.dispatch_token_bytes, 64u);       // 16 header + 32 payload + align16(8) = 16
  EXPECT_EQ(l.combine_row_bytes, 64u);          // 32 * 2
  EXPECT_EQ(l.payload_offset_in_token(), 16u);  // right after the header
  EXPECT_EQ(l.scale_offset_in_token(), 48u);    // 16 + 32
}

TEST(Layout, SmallConfigSymmetricRegions) {
  const BufferLayout l = make_buffer_layout(small_config());
  // dispatch_recv: 2 groups * 4 tokens = 8 slots * 64 B = 512 B, at 0 -> cursor 512
  EXPECT_EQ(l.dispatch_recv_offset, 0u);
  // combine_recv: align256(512) = 512; 4 tokens * 3 k * 64 B = 768 B -> cursor 1280
  EXPECT_EQ(l.combine_recv_offset, 512u);
  // dispatch_counts: align256(1280) = 1280 (5 * 256); 4 ranks * 8 B = 32 B -> cursor 1312
  EXPECT_EQ(l.dispatch_counts_offset, 1280u);
  // combine_done: align256(1312) = 1536 (6 * 256); 4 * 8 B = 32 B -> cursor 1568
  EXPECT_EQ(l.combine_done_offset, 1536u);
  // send_rows: align256(1568) = 1792 (7 * 256); 4 tokens * 64 B = 256 B -> cursor 2048
  EXPECT_EQ(l.send_rows_offset, 1792u);
  // send_announce: align256(2048) = 2048 (8 * 256); 8 B -> cursor 2056
  EXPECT_EQ(l.send_announce_offset, 2048u);
  // send_stamps: align256(2056) = 2304 (9 * 256); 4 tokens * 8 B = 32 B -> cursor 2336
  EXPECT_EQ(l.send_stamps_offset, 2304u);
  // combine_slots: align256(2336) = 2560 (10 * 256); 2 groups * 4 tokens * 3 k * 4 B = 96 B -> cursor 2656
  EXPECT_EQ(l.combine_slots_offset, 2560u);
  // expert_outputs: align256(2656) = 2816 (11 * 256); 2 local experts * 8 rows * 64 B = 1024 B -> cursor 3840
  EXPECT_EQ(l.expert_outputs_offset, 2816u);
  // 3840 = 15 * 256 is already aligned
  EXPECT_EQ(l.symmetric_bytes, 3840u);
}

TEST(Layout, SmallConfigWorkspace) {
  const BufferLayout l = make_buffer_layout(small_config());
  // send_counts: 4 ranks * 4 B = 16 B at 0 -> 16
  EXPECT_EQ(l.send_counts_offset, 0u);
  // recv_counts: align256(16) = 256; 2 * 4 B = 8 B -> 264
  EXPECT_EQ(l.recv_counts_offset, 256u);
  // routes: align256(264) = 512; 2 local experts * 8 rows * 8 B = 128 B -> 640
  EXPECT_EQ(l.routes_offset, 512u);
  // phase_counters: align256(640) = 768; 3 * 4 B = 12 B -> 780
  EXPECT_EQ(l.phase_counters_offset, 768u);
  // pull_state: align256(780) = 1024; (2 local experts + 2 groups + 1) * 4 B = 20 B -> 1044
  EXPECT_EQ(l.pull_state_offset, 1024u);
  // dispatch_epoch: align256(1044) = 1280; 4 B -> 1284
  EXPECT_EQ(l.dispatch_epoch_offset, 1280u);
  // align256(1284) = 1536
  EXPECT_EQ(l.workspace_bytes, 1536u);
}

TEST(Layout, SmallConfigAccessors) {
  const BufferLayout l = make_buffer_layout(small_config());
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
  EXPECT_EQ(l.combine_done_offset_of(3), 1560u);  // last: 1536 + 3 * 8

  // Send row per token, 64 B each, base 1792, right after combine_done (1536 + 32 = 1568, aligned up).
  EXPECT_EQ(l.send_row_offset(0), 1792u);
  EXPECT_EQ(l.send_row_offset(3), 1984u);          // last: 1792 + 3 * 64
  EXPECT_EQ(1984u + 64u, l.send_announce_offset);  // the last row ends where the announcement starts

  // Stamp per token, 8 B each, base 2304.
  EXPECT_EQ(l.send_stamp_offset(0), 2304u);
  EXPECT_EQ(l.send_stamp_offset(3), 2328u);  // last: 2304 + 3 * 8; ends at 2336 <= 2560

  // Slot (group, token, k) is (group * 4 + token) * 3 + k; 4 B each, base 2560.
  EXPECT_EQ(l.combine_slot_offset(0, 0, 0), 2560u);
  EXPECT_EQ(l.combine_slot_offset(0, 1, 2), 2580u);  // 2560 + (1 * 3 + 2 = 5) * 4
  EXPECT_EQ(l.combine_slot_offset(1, 3, 2), 2652u);  // last: 2560 + ((1 * 4 + 3) * 3 + 2 = 23) * 4; ends at 2656

  // Expert output (local expert, row) is expert * 8 + row; 64 B each, base 2816.
  EXPECT_EQ(l.expert_output_offset(0, 0), 2816u);
  EXPECT_EQ(l.expert_output_offset(1, 0), 3328u);  // 2816 + 8 * 64
  EXPECT_EQ(l.expert_output_offset(1, 7), 3776u);  // last: 2816 + 15 * 64; ends at 3840 = symmetric_bytes

  // Route (expert, row) is expert * 8 + row; 8 B each, base 512.
  EXPECT_EQ(l.route_offset(0, 0), 512u);
  EXPECT_EQ(l.route_offset(0, 5), 552u);  // 512 + 5 * 8
  EXPECT_EQ(l.route_offset(1, 7), 632u);  // last: 512 + (1 * 8 + 7 = 15) * 8 = 512 + 120; ends at 640
}

TEST(Layout, SmallConfigRegionsDisjoint) { expect_layout_regions_disjoint(make_buffer_layout(small_config())); }

TEST(Layout, Bf16ConfigDispatchTokenWiderThanCombineRow) {
  const BufferLayout l = make_buffer_layout(bf16_config());
  EXPECT_EQ(l.num_local_experts, 2u);         // 6 / 3
  EXPECT_EQ(l.num_dp_groups, 3u);             // 3 / 1
  EXPECT_EQ(l.max_recv_tokens, 6u);           // 2 * 3
  EXPECT_EQ(l.token_header_bytes, 32u);       // align16(4 + 4 * 5 = 24) = 32
  EXPECT_EQ(l.dispatch_token_bytes, 80u);     // 32 + 32 + align16(4) = 16
  EXPECT_EQ(l.combine_row_bytes, 32u);        // 16 * 2
  EXPECT_EQ(l.scale_offset_in_token(), 64u);  // 32 + 32

  // dispatch_recv: 3 groups * 2 tokens = 6 slots * 80 B = 480 B -> cursor 480
  EXPECT_EQ(l.dispatch_recv_offset, 0u);
  // combine_recv: align256(480) = 512; 2 * 5 * 32 B = 320 B -> 832
  EXPECT_EQ(l.combine_recv_offset, 512u);
  // dispatch_counts: align256(832) = 1024; 3 ranks * 8 B = 24 B -> 1048
  EXPECT_EQ(l.dispatch_counts_offset, 1024u);
  // combine_done: align256(1048) = 1280; 3 * 8 B = 24 B -> 1304
  EXPECT_EQ(l.combine_done_offset, 1280u);
  // send_rows: align256(1304) = 1536; 2 tokens * 80 B = 160 B -> 1696
  EXPECT_EQ(l.send_rows_offset, 1536u);
  // send_announce: align256(1696) = 1792; 8 B -> 1800
  EXPECT_EQ(l.send_announce_offset, 1792u);
  // send_stamps: align256(1800) = 2048; 2 tokens * 8 B = 16 B -> 2064
  EXPECT_EQ(l.send_stamps_offset, 2048u);
  // combine_slots: align256(2064) = 2304; 3 groups * 2 tokens * 5 k * 4 B = 120 B -> 2424
  EXPECT_EQ(l.combine_slots_offset, 2304u);
  // expert_outputs: align256(2424) = 2560; 2 local experts * 6 rows * 32 B = 384 B -> 2944
  EXPECT_EQ(l.expert_outputs_offset, 2560u);
  // align256(2944) = 3072
  EXPECT_EQ(l.symmetric_bytes, 3072u);

  // send 3 * 4 = 12 at 0; recv at 256 (+8 = 264); routes at 512 (2 * 6 * 8 = 96 -> 608);
  // phase at 768 (+8 = 776); pull_state at align256(776) = 1024 ((2 + 3 + 1) * 4 = 24 -> 1048);
  // dispatch_epoch at align256(1048) = 1280 (+4 = 1284); total align256(1284) = 1536
  EXPECT_EQ(l.send_counts_offset, 0u);
  EXPECT_EQ(l.recv_counts_offset, 256u);
  EXPECT_EQ(l.routes_offset, 512u);
  EXPECT_EQ(l.phase_counters_offset, 768u);
  EXPECT_EQ(l.pull_state_offset, 1024u);
  EXPECT_EQ(l.dispatch_epoch_offset, 1280u);
  EXPECT_EQ(l.workspace_bytes, 1536u);

  EXPECT_EQ(l.dispatch_token_offset(2, 1), 400u);    // last slot: (2 * 2 + 1 = 5) * 80; ends at 480
  EXPECT_EQ(l.combine_row_offset(1, 4), 800u);       // last row: 512 + (1 * 5 + 4 = 9) * 32; ends at 832
  EXPECT_EQ(l.dispatch_count_offset(2), 1040u);      // last: 1024 + 2 * 8
  EXPECT_EQ(l.combine_done_offset_of(2), 1296u);     // last: 1280 + 2 * 8
  EXPECT_EQ(l.send_row_offset(0), 1536u);            // first: the region base
  EXPECT_EQ(l.send_row_offset(1), 1616u);            // last: 1536 + 1 * 80; ends at 1696
  EXPECT_EQ(l.send_stamp_offset(0), 2048u);          // first: the region base
  EXPECT_EQ(l.send_stamp_offset(1), 2056u);          // last: 2048 + 1 * 8; ends at 2064 <= 2304
  EXPECT_EQ(l.combine_slot_offset(2, 1, 4), 2420u);  // last: 2304 + ((2 * 2 + 1) * 5 + 4 = 29) * 4; ends at 2424
  EXPECT_EQ(l.expert_output_offset(1, 5), 2912u);    // last: 2560 + (1 * 6 + 5 = 11) * 32; ends at 2944
  EXPECT_EQ(l.route_offset(1, 5), 600u);             // last: 512 + (1 * 6 + 5 = 11) * 8

  expect_layout_regions_disjoint(l);
}

TEST(Layout, DeepSeekV3Config) {
  const BufferLayout l = make_buffer_layout(deepseek_v3_config());
  EXPECT_EQ(l.num_local_experts, 32u);  // 256 / 8
  EXPECT_EQ(l.num_dp_groups, 8u);       // 8 / 1
  EXPECT_EQ(l.max_recv_tokens, 1024u);  // 128 * 8

  EXPECT_EQ(l.token_header_bytes, 48u);         // align16(4 + 4 * 8 = 36) = 48
  EXPECT_EQ(l.dispatch_token_bytes, 7440u);     // 48 + 7168 + align16(224) = 224 (14 * 16)
  EXPECT_EQ(l.combine_row_bytes, 14336u);       // 7168 * 2
  EXPECT_EQ(l.scale_offset_in_token(), 7216u);  // 48 + 7168

  // dispatch_recv: 8 groups * 128 tokens = 1024 slots * 7440 B = 7,618,560 B (= 4 * 7440 * 256)
  EXPECT_EQ(l.dispatch_recv_offset, 0u);
  // combine_recv: 7,618,560 is 256-aligned; 128 * 8 * 14336 = 14,680,064 B -> 22,298,624
  EXPECT_EQ(l.combine_recv_offset, 7618560u);
  // dispatch_counts: 22,298,624 is 256-aligned (14,680,064 = 1024 * 14336); 8 ranks * 8 B = 64 B -> 22,298,688
  EXPECT_EQ(l.dispatch_counts_offset, 22298624u);
  // combine_done: align256(22,298,688) = 22,298,624 + 256 = 22,298,880; 8 * 8 = 64 B -> 22,298,944
  EXPECT_EQ(l.combine_done_offset, 22298880u);
  // send_rows: align256(22,298,944) = 22,298,880 + 256 = 22,299,136; 128 * 7440 = 952,320 B (= 3720 * 256)
  // -> 23,251,456
  EXPECT_EQ(l.send_rows_offset, 22299136u);
  // send_announce: 23,251,456 is 256-aligned; 8 B -> 23,251,464
  EXPECT_EQ(l.send_announce_offset, 23251456u);
  // send_stamps: align256(23,251,464) = 23,251,456 + 256 = 23,251,712; 128 tokens * 8 = 1024 B -> 23,252,736
  EXPECT_EQ(l.send_stamps_offset, 23251712u);
  // combine_slots: 23,252,736 = 23,251,712 + 4 * 256 is already aligned; 8 groups * 128 tokens * 8 k * 4 B
  // = 32,768 B -> 23,285,504
  EXPECT_EQ(l.combine_slots_offset, 23252736u);
  // expert_outputs: 23,285,504 is aligned (32,768 = 128 * 256); 32 * 1024 rows * 14336 B = 469,762,048 B
  // -> 493,047,552
  EXPECT_EQ(l.expert_outputs_offset, 23285504u);
  // 469,762,048 = 1,835,008 * 256, so the end is already aligned
  EXPECT_EQ(l.symmetric_bytes, 493047552u);

  // send_counts: 8 ranks * 4 = 32 at 0; recv_counts: align256(32) = 256, 32 * 4 = 128 -> 384;
  // routes: align256(384) = 512, 32 * 1024 * 8 = 262,144 -> 262,656 (= 1026 * 256);
  // phase_counters: at 262,656, +12 -> 262,668;
  // pull_state: align256(262,668) = 262,912 (1027 * 256), (32 + 8 + 1) * 4 = 164 -> 263,076;
  // dispatch_epoch: align256(263,076) = 263,168 (1028 * 256), 4 -> 263,172;
  // total: align256(263,172) = 263,424 (1029 * 256)
  EXPECT_EQ(l.send_counts_offset, 0u);
  EXPECT_EQ(l.recv_counts_offset, 256u);
  EXPECT_EQ(l.routes_offset, 512u);
  EXPECT_EQ(l.phase_counters_offset, 262656u);
  EXPECT_EQ(l.pull_state_offset, 262912u);
  EXPECT_EQ(l.dispatch_epoch_offset, 263168u);
  EXPECT_EQ(l.workspace_bytes, 263424u);

  // Last slot: 7 * 128 + 127 = 1023; 1023 * 7440 = 7,611,120 (+7440 = end)
  EXPECT_EQ(l.dispatch_token_offset(7, 127), 7611120u);
  // Second group, first slot: 128 slots * 7440 = 952,320
  EXPECT_EQ(l.dispatch_token_offset(1, 0), 952320u);
  // Last row: 127 * 8 + 7 = 1023; 7,618,560 + 1023 * 14336 (= 14,665,728) = 22,284,288
  EXPECT_EQ(l.combine_row_offset(127, 7), 22284288u);
  // Last count: 22,298,624 + 7 * 8 = 22,298,680
  EXPECT_EQ(l.dispatch_count_offset(7), 22298680u);
  EXPECT_EQ(l.combine_done_offset_of(7), 22298936u);  // 22,298,880 + 7 * 8
  EXPECT_EQ(l.send_row_offset(0), 22299136u);         // first send row: the region base, right after combine_done
  // Last send row: 22,299,136 + 127 * 7440 (= 944,880) = 23,244,016; ends at 23,251,456
  EXPECT_EQ(l.send_row_offset(127), 23244016u);
  EXPECT_EQ(l.send_stamp_offset(0), 23251712u);
  // Last stamp: 23,251,712 + 127 * 8 (= 1016) = 23,252,728; ends at 23,252,736, where combine_slots starts
  EXPECT_EQ(l.send_stamp_offset(127), 23252728u);
  // Last slot: (7 * 128 + 127) * 8 + 7 = 8191; 23,252,736 + 8191 * 4 = 23,285,500; ends at 23,285,504
  EXPECT_EQ(l.combine_slot_offset(7, 127, 7), 23285500u);
  // Last expert output: 31 * 1024 + 1023 = 32767; 23,285,504 + 32767 * 14336 (= 469,747,712) = 493,033,216;
  // ends at 493,047,552 = symmetric_bytes
  EXPECT_EQ(l.expert_output_offset(31, 1023), 493033216u);
  // Last route: 31 * 1024 + 1023 = 32767; 512 + 32767 * 8 = 512 + 262,136 = 262,648; ends at 262,656
  EXPECT_EQ(l.route_offset(31, 1023), 262648u);

  expect_layout_regions_disjoint(l);
}

TEST(Layout, ValidatesConfig) {
  AllToAllConfig config = small_config();
  config.rank = 4;
  const std::string message = config_error_message([&] { make_buffer_layout(config); });
  EXPECT_THAT(message, HasSubstr("AllToAllConfig.rank"));
  EXPECT_THAT(message, HasSubstr("got 4"));
}

// small_config() with 64 experts (16 local experts): only what is sized by local experts grows (expert_outputs
// to 16 * 8 * 64 = 8192 B; recv_counts, routes and pull_state in the workspace), so every other region sits where
// small_config() puts it.
AllToAllConfig many_experts_config() {
  AllToAllConfig config = small_config();
  config.num_experts = 64;
  return config;
}

TEST(Layout, ManyExpertsConfigRegions) {
  const BufferLayout l = make_buffer_layout(many_experts_config());
  EXPECT_EQ(l.num_local_experts, 16u);     // 64 / 4
  EXPECT_EQ(l.num_dp_groups, 2u);          // 4 / 2
  EXPECT_EQ(l.dispatch_token_bytes, 64u);  // as small_config()
  // dispatch_recv: 2 groups * 4 tokens = 8 slots * 64 B = 512 B -> 512
  // combine_recv: at 512; 4 * 3 * 64 B = 768 B -> 1280
  // dispatch_counts: align256(1280) = 1280 (5 * 256); 4 ranks * 8 B = 32 B -> 1312
  // combine_done: align256(1312) = 1536 (6 * 256); 4 * 8 B = 32 B -> 1568
  // send_rows: align256(1568) = 1792 (7 * 256); 4 * 64 B = 256 B -> 2048
  // send_announce: at 2048 (8 * 256); 8 B -> 2056
  // send_stamps: align256(2056) = 2304 (9 * 256); 4 * 8 B = 32 B -> 2336
  // combine_slots: align256(2336) = 2560 (10 * 256); 2 * 4 * 3 * 4 B = 96 B -> 2656
  // expert_outputs: align256(2656) = 2816 (11 * 256); 16 * 8 * 64 B = 8192 B -> 11008 (43 * 256)
  EXPECT_EQ(l.dispatch_recv_offset, 0u);
  EXPECT_EQ(l.combine_recv_offset, 512u);
  EXPECT_EQ(l.dispatch_counts_offset, 1280u);
  EXPECT_EQ(l.combine_done_offset, 1536u);
  EXPECT_EQ(l.send_rows_offset, 1792u);
  EXPECT_EQ(l.send_announce_offset, 2048u);
  EXPECT_EQ(l.send_stamps_offset, 2304u);
  EXPECT_EQ(l.combine_slots_offset, 2560u);
  EXPECT_EQ(l.expert_outputs_offset, 2816u);
  EXPECT_EQ(l.symmetric_bytes, 11008u);
  EXPECT_EQ(l.send_row_offset(3), 1984u);            // last: 1792 + 3 * 64; ends at 2048
  EXPECT_EQ(l.send_stamp_offset(3), 2328u);          // last: 2304 + 3 * 8; ends at 2336
  EXPECT_EQ(l.expert_output_offset(15, 7), 10944u);  // last: 2816 + 127 * 64; ends at 11008 = symmetric_bytes
  // Workspace: send 4 * 4 = 16 at 0; recv at 256 (16 * 4 = 64 -> 320); routes at align256(320) = 512
  // (16 * 8 rows * 8 = 1024 -> 1536); phase at 1536 (+8 = 1544); pull_state at align256(1544) = 1792
  // ((16 + 2 + 1) * 4 = 76 -> 1868); dispatch_epoch at align256(1868) = 2048 (+4 = 2052); total
  // align256(2052) = 2304
  EXPECT_EQ(l.recv_counts_offset, 256u);
  EXPECT_EQ(l.routes_offset, 512u);
  EXPECT_EQ(l.phase_counters_offset, 1536u);
  EXPECT_EQ(l.pull_state_offset, 1792u);
  EXPECT_EQ(l.dispatch_epoch_offset, 2048u);
  EXPECT_EQ(l.workspace_bytes, 2304u);
  expect_layout_regions_disjoint(l);
}

// Layouts that end near 2^64. Of the symmetric regions only expert_outputs, [local experts][max_recv_tokens]
// rows of hidden_dim * 2 bytes, gets there from a valid configuration: num_experts, max_num_tokens and the byte
// sizes are below 2^31, experts_per_token at most 65535, and the configuration keeps max_num_tokens * world_size /
// dp_size and max_num_tokens * ceil(hidden_dim / 256) below 2^31 too, so the regions before it end well below
// 2^64 (dispatch_recv, the largest, below about 2^63) and none of them can be the one that overflows.
//
// Here: 4 tokens on one rank, hidden_dim 2^30 (combine rows of 2^31 B), no scales, and a payload that makes each
// dispatch token header + payload = 2^30 - 192 B. Then dispatch_recv and send_rows are 4 * (2^30 - 192) =
// 2^32 - 768 B each (= 256 * (2^24 - 3), so each ends 256-aligned), combine_recv is 4 tokens * k * 2^31 = k * 2^33 B,
// and expert_outputs is num_experts * 4 rows * 2^31 = num_experts * 2^33 B.
AllToAllConfig near_2to64_config(int64_t experts_per_token, int64_t hidden_dim_bytes, int64_t num_experts) {
  AllToAllConfig config;
  config.max_num_tokens = 4;
  config.num_experts = num_experts;
  config.experts_per_token = experts_per_token;
  config.rank = 0;
  config.world_size = 1;
  config.dp_size = 1;
  config.hidden_dim = int64_t(1) << 30;
  config.hidden_dim_bytes = hidden_dim_bytes;
  config.hidden_dim_scale_bytes = 0;
  return config;
}

// One expert a token: a 16-byte header (align16(4 + 4 = 8)) and a payload of 2^30 - 208 B; expert_outputs
// starts at 2^34 - 256 (see LargestAlignedEndStillFits).
AllToAllConfig top1_near_2to64_config(int64_t num_experts) {
  return near_2to64_config(1, (int64_t(1) << 30) - 208, num_experts);
}

// 17 experts a token: an 80-byte header (align16(4 + 68 = 72)) and a payload of 2^30 - 272 B; combine_slots
// (4 * 17 * 4 = 272 B) then takes two 256-byte blocks, so expert_outputs starts at 36 * 2^32 = 18 * 2^33 (see
// ExpertOutputsEndingAt2To64).
AllToAllConfig top17_near_2to64_config(int64_t num_experts) {
  return near_2to64_config(17, (int64_t(1) << 30) - 272, num_experts);
}

TEST(LayoutOverflow, LargestAlignedEndStillFits) {
  // 2^31 - 2 experts (the most is 2^31 - 1), all local: expert_outputs ends at 2^64 - 256, the largest 256-aligned
  // size, so the layout is valid. One expert more passes 2^64 (ExpertOutputsEndPastAddressSpace).
  const BufferLayout l = make_buffer_layout(top1_near_2to64_config(2147483646));
  EXPECT_EQ(l.num_local_experts, 2147483646u);
  EXPECT_EQ(l.max_recv_tokens, 4u);
  EXPECT_EQ(l.token_header_bytes, 16u);
  EXPECT_EQ(l.dispatch_token_bytes, 1073741632u);  // 16 + 2^30 - 208 = 2^30 - 192
  EXPECT_EQ(l.combine_row_bytes, 2147483648u);     // 2^30 * 2 = 2^31
  // dispatch_recv: 4 slots * (2^30 - 192) B = 2^32 - 768 B at 0
  EXPECT_EQ(l.dispatch_recv_offset, 0u);
  // combine_recv: 2^32 - 768 is aligned; 4 * 1 * 2^31 = 2^33 B -> 3 * 2^32 - 768
  EXPECT_EQ(l.combine_recv_offset, 4294966528u);  // 2^32 - 768
  // dispatch_counts: at 3 * 2^32 - 768; 1 rank * 8 B
  EXPECT_EQ(l.dispatch_counts_offset, 12884901120u);  // 3 * 2^32 - 768
  // combine_done: align256(3 * 2^32 - 760) = 3 * 2^32 - 512; 8 B
  EXPECT_EQ(l.combine_done_offset, 12884901376u);  // 3 * 2^32 - 512
  // send_rows: align256(3 * 2^32 - 504) = 3 * 2^32 - 256; 2^32 - 768 B -> 2^34 - 1024
  EXPECT_EQ(l.send_rows_offset, 12884901632u);  // 3 * 2^32 - 256
  // send_announce: at 2^34 - 1024; 8 B
  EXPECT_EQ(l.send_announce_offset, 17179868160u);  // 2^34 - 1024
  // send_stamps: align256(2^34 - 1016) = 2^34 - 768; 4 * 8 = 32 B
  EXPECT_EQ(l.send_stamps_offset, 17179868416u);  // 2^34 - 768
  // combine_slots: align256(2^34 - 736) = 2^34 - 512; 1 group * 4 tokens * 1 k * 4 B = 16 B
  EXPECT_EQ(l.combine_slots_offset, 17179868672u);  // 2^34 - 512
  // expert_outputs: align256(2^34 - 496) = 2^34 - 256; (2^31 - 2) * 2^33 = 2^64 - 2^34 B -> 2^64 - 256
  EXPECT_EQ(l.expert_outputs_offset, 17179868928u);       // 2^34 - 256
  EXPECT_EQ(l.symmetric_bytes, 18446744073709551360ull);  // 2^64 - 256, already aligned
  // Last row (2^31 - 3, 3): (2^31 - 3) * 4 + 3 = 2^33 - 9; 2^34 - 256 + (2^33 - 9) * 2^31 = 2^64 - 2^31 - 256,
  // ending at 2^64 - 256: the 64-bit index arithmetic of the accessor.
  EXPECT_EQ(l.expert_output_offset(2147483645, 3), 18446744071562067712ull);
  expect_layout_regions_disjoint(l);
}

TEST(LayoutOverflow, ExpertOutputsEndPastAddressSpace) {
  // 2^31 - 1 experts: (2^31 - 1) * 2^33 = 2^64 - 2^33 B still fits 64 bits, but from 2^34 - 256 (as in
  // LargestAlignedEndStillFits) the region ends at 2^64 + 2^33 - 256.
  const std::string message = config_error_message([&] { make_buffer_layout(top1_near_2to64_config(2147483647)); });
  EXPECT_THAT(message, HasSubstr("expert_outputs"));
  EXPECT_THAT(message, HasSubstr("overflows"));
  EXPECT_THAT(message, HasSubstr("(17179868928 + 18446744065119617024)"));  // 2^34 - 256 + (2^64 - 2^33)
}

TEST(LayoutOverflow, ExpertOutputsEndingAt2To64) {
  // top17_near_2to64_config():
  //   dispatch_recv    [0, 2^32 - 768)
  //   combine_recv     at 2^32 - 768; 4 * 17 * 2^31 = 17 * 2^33 = 34 * 2^32 B -> 35 * 2^32 - 768
  //   dispatch_counts  at 35 * 2^32 - 768, combine_done at 35 * 2^32 - 512 (8 B each)
  //   send_rows        at 35 * 2^32 - 256; 2^32 - 768 B -> 36 * 2^32 - 1024
  //   send_announce    at 36 * 2^32 - 1024 (8 B), send_stamps at 36 * 2^32 - 768 (32 B)
  //   combine_slots    at 36 * 2^32 - 512; 272 B -> 36 * 2^32 - 240
  //   expert_outputs   at align256(36 * 2^32 - 240) = 36 * 2^32; num_experts * 2^33 B
  // 2^31 - 19 experts: expert_outputs ends at 18 * 2^33 + (2^31 - 19) * 2^33 = 2^64 - 2^33, which fits.
  const BufferLayout l = make_buffer_layout(top17_near_2to64_config(2147483629));
  EXPECT_EQ(l.token_header_bytes, 80u);
  EXPECT_EQ(l.dispatch_token_bytes, 1073741632u);         // 80 + 2^30 - 272 = 2^30 - 192
  EXPECT_EQ(l.send_rows_offset, 150323855104u);           // 35 * 2^32 - 256
  EXPECT_EQ(l.combine_slots_offset, 154618822144u);       // 36 * 2^32 - 512
  EXPECT_EQ(l.expert_outputs_offset, 154618822656u);      // 36 * 2^32
  EXPECT_EQ(l.symmetric_bytes, 18446744065119617024ull);  // 2^64 - 2^33
  // 2^31 - 18 experts: (2^31 - 18) * 2^33 = 2^64 - 36 * 2^32 B, so the region ends exactly at 2^64, one past the
  // largest offset.
  const std::string message = config_error_message([&] { make_buffer_layout(top17_near_2to64_config(2147483630)); });
  EXPECT_THAT(message, HasSubstr("expert_outputs"));
  EXPECT_THAT(message, HasSubstr("overflows"));
  EXPECT_THAT(message, HasSubstr("(154618822656 + 18446743919090728960)"));  // 36 * 2^32 + (2^64 - 36 * 2^32)
}

TEST(LayoutOverflow, RowsPerLocalExpertFromConfig) {
  // (2^31 - 1) tokens * 8 DP groups does not fit the u32 max_recv_tokens; the layout must not truncate it.
  AllToAllConfig config = deepseek_v3_config();
  config.max_num_tokens = 2147483647;
  config.num_experts = 8;
  const std::string message = config_error_message([&] { make_buffer_layout(config); });
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
  const std::string message = config_error_message([&] { make_buffer_layout(config); });
  EXPECT_THAT(message, HasSubstr("expert_outputs"));
  EXPECT_THAT(message, HasSubstr("overflows"));
}

TEST(SymmetricHeap, FitsInLargeHeap) {
  const BufferLayout l = make_buffer_layout(deepseek_v3_config());
  EXPECT_NO_THROW(require_fits_symmetric_heap(l.symmetric_bytes, 1ull << 30));  // 1 GiB
  // 493,047,552 + 64 MiB (67,108,864) reserve = 560,156,416: exactly enough.
  EXPECT_NO_THROW(require_fits_symmetric_heap(l.symmetric_bytes, 560156416ull));
}

TEST(SymmetricHeap, OneByteShort) {
  const BufferLayout l = make_buffer_layout(deepseek_v3_config());
  const std::string message =
      config_error_message([&] { require_fits_symmetric_heap(l.symmetric_bytes, 560156415ull); });
  EXPECT_THAT(message, HasSubstr("560156416"));
}

TEST(SymmetricHeap, SmallHeapNamesNeededBytesAndVariable) {
  const BufferLayout l = make_buffer_layout(deepseek_v3_config());
  const std::string message =
      config_error_message([&] { require_fits_symmetric_heap(l.symmetric_bytes, 256ull << 20); });
  EXPECT_THAT(message, HasSubstr("493047552"));  // symmetric bytes
  EXPECT_THAT(message, HasSubstr("560156416"));  // + 64 MiB reserve
  EXPECT_THAT(message, HasSubstr("268435456"));  // the heap it was given: 256 * 2^20
  EXPECT_THAT(message, HasSubstr("NVSHMEM_SYMMETRIC_SIZE"));
  // 560,156,416 = 534 * 2^20 (559,939,584) + 216,832, so ceil(560,156,416 / 2^20) = 535
  EXPECT_THAT(message, HasSubstr("NVSHMEM_SYMMETRIC_SIZE>=535M"));
}

TEST(SymmetricHeap, NeededBytesOverflowIsAnError) {
  // symmetric_bytes = 2^64 - 256 (see LargestAlignedEndStillFits); + 64 MiB reserve passes 2^64. Unchecked, the
  // sum wrapped to 64 MiB - 256 and even a small heap appeared to fit.
  const BufferLayout l = make_buffer_layout(top1_near_2to64_config(2147483646));
  ASSERT_EQ(l.symmetric_bytes, 18446744073709551360ull);
  for (const uint64_t heap_bytes : {uint64_t(1) << 30, std::numeric_limits<uint64_t>::max()}) {
    const std::string message =
        config_error_message([&] { require_fits_symmetric_heap(l.symmetric_bytes, heap_bytes); });
    EXPECT_THAT(message, HasSubstr("symmetric heap"));
    EXPECT_THAT(message, HasSubstr("overflows"));
  }
}

TEST(SymmetricHeap, NeededJustBelow2To64) {
  // symmetric_bytes = 2^64 - 2^26 - 256, so needed = + 64 MiB (2^26) = 2^64 - 256 fits. (The check takes the size
  // alone; no configuration need lay it out.)
  const uint64_t symmetric_bytes = 18446744073642442496ull;  // 2^64 - 2^26 - 256
  EXPECT_NO_THROW(require_fits_symmetric_heap(symmetric_bytes, std::numeric_limits<uint64_t>::max()));
  const std::string message = config_error_message([&] { require_fits_symmetric_heap(symmetric_bytes, 1ull << 30); });
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
  const BufferLayout small = make_buffer_layout(small_config());  // 2 local experts, 4 ranks
  EXPECT_EQ(CombineShared::expert_start_word(small), 3u);         // after 2 counts and a spare word
  EXPECT_EQ(CombineShared::rank_bits_word(small), 6u);            // 2 * (2 + 1)
  EXPECT_EQ(CombineShared::rank_bit_words(small), 1u);
  EXPECT_EQ(CombineShared::bytes(small), 28u);  // (6 + 1) * 4
  for (const auto& [world, words] : {std::pair{32, 1u}, std::pair{33, 2u}, std::pair{64, 2u}, std::pair{65, 3u}}) {
    AllToAllConfig config = small_config();
    config.world_size = world;
    config.dp_size = 1;
    config.num_experts = 2 * world;  // still 2 local experts
    const BufferLayout l = make_buffer_layout(config);
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
  const BufferLayout l = make_buffer_layout(small_config());
  const LayoutSignature signature = layout_signature(l);
  const uint64_t expected[LayoutSignature::kWords] = {8, 3, 4, 2, 4, 32, 32, 8, 3840};
  for (int w = 0; w < LayoutSignature::kWords; ++w) EXPECT_EQ(signature.words[w], expected[w]) << w;
}

TEST(LayoutSignature, AgreeingRanksPass) {
  const LayoutSignature signature = layout_signature(make_buffer_layout(small_config()));
  require_same_layout({signature, signature, signature, signature});
  require_same_layout({signature});
}

TEST(LayoutSignature, TheFirstDifferingFieldOfTheFirstDifferingRankIsNamed) {
  AllToAllConfig padded_scales = small_config();
  padded_scales.hidden_dim_scale_bytes = 4;  // pads to the same 16-byte token tail as 8
  AllToAllConfig more_tokens = small_config();
  more_tokens.max_num_tokens = 5;
  const LayoutSignature good = layout_signature(make_buffer_layout(small_config()));
  const LayoutSignature scales = layout_signature(make_buffer_layout(padded_scales));
  const LayoutSignature tokens = layout_signature(make_buffer_layout(more_tokens));
  EXPECT_EQ(scales.words[8], good.words[8]);  // the same buffer size: only the signature tells them apart
  // Rank 3 differs in a field before rank 2's, but rank 2 is the first rank that differs.
  EXPECT_EQ(config_error_message([&] {
              require_same_layout({good, good, scales, tokens});
            }),
            "ranks disagree on hidden_dim_scale_bytes: rank 0 has 8, rank 2 has 4; every rank must construct its "
            "all-to-all alike");
  EXPECT_THAT(config_error_message([&] {
                require_same_layout({good, tokens});
              }),
              HasSubstr("ranks disagree on max_num_tokens: rank 0 has 4, rank 1 has 5;"));
  // The last word has its name too.
  LayoutSignature bigger = good;
  bigger.words[LayoutSignature::kWords - 1] += kRegionAlign;
  EXPECT_THAT(config_error_message([&] {
                require_same_layout({good, bigger});
              }),
              HasSubstr("ranks disagree on symmetric buffer bytes: rank 0 has 3840, rank 1 has 4096;"));
}

}  // namespace
}  // namespace expertwire
