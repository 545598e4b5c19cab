// reference/high_throughput.h: the oracle of the high-throughput layouts, pinned down on small hand-made cases.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/error.h"
#include "reference/high_throughput.h"
#include "reference/reference.h"
#include "tests/unit/config_error.h"

namespace expertwire::reference {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// 8 experts on 2 ranks (local experts 0..3 on rank 0, 4..7 on rank 1), top-3, 16-byte payloads.
HighThroughputShape shape(int64_t alignment = 1) {
  HighThroughputShape s;
  s.max_tokens_per_rank = 4;
  s.num_experts = 8;
  s.experts_per_token = 3;
  s.world_size = 2;
  s.hidden_dim_bytes = 16;
  s.hidden_dim_scale_bytes = 4;
  s.expert_alignment = alignment;
  return s;
}

// One rank's tokens, with payload bytes that say whose they are.
struct Tokens {
  std::vector<int64_t> idx;
  std::vector<float> weights;
  std::vector<uint8_t> x, scales;
  RankTokens view(uint8_t tag) {
    const int64_t m = int64_t(idx.size()) / 3;
    x.assign(size_t(m) * 16, tag);
    scales.assign(size_t(m) * 4, uint8_t(tag + 1));
    return RankTokens{m, x.data(), scales.data(), idx.data(), weights.data()};
  }
};

// Rank 0: token 0 -> experts 1, 5, -1; token 1 -> 6, 7, 2. Rank 1: token 0 -> 0, 1, 3; token 1 -> -1, -1, -1.
struct TwoRanks {
  Tokens t0{{1, 5, -1, 6, 7, 2}, {0.5f, 0.25f, 0.0f, 0.125f, 0.375f, 0.5f}, {}, {}};
  Tokens t1{{0, 1, 3, -1, -1, -1}, {0.25f, 0.5f, 0.25f, 0.0f, 0.0f, 0.0f}, {}, {}};
  std::vector<RankTokens> sources{t0.view(10), t1.view(20)};
};

TEST(HighThroughputReference, RankPackedReceivesEachTokenOncePerRank) {
  TwoRanks w;
  const RankPackedReceive r0 = dispatch_rank_packed(shape(), 0, w.sources);
  ASSERT_EQ(r0.rows.size(), 3u);  // (0, 0), (0, 1), (1, 0); rank 1's token 1 names no expert
  EXPECT_EQ(r0.rows[0].source_rank, 0u);
  EXPECT_EQ(r0.rows[0].token, 0u);
  EXPECT_EQ(r0.rows[1].token, 1u);
  EXPECT_EQ(r0.rows[2].source_rank, 1u);
  EXPECT_EQ(r0.rows[2].x[0], 20);
  EXPECT_EQ(r0.rows[2].x_scale[0], 21);
  EXPECT_THAT(r0.recv_topk_idx, ElementsAre(1, -1, -1, -1, -1, 2, 0, 1, 3));
  EXPECT_THAT(r0.recv_topk_weights, ElementsAre(0.5f, 0, 0, 0, 0, 0.5f, 0.25f, 0.5f, 0.25f));
  EXPECT_THAT(r0.tokens_per_expert, ElementsAre(1, 2, 1, 1));

  const RankPackedReceive r1 = dispatch_rank_packed(shape(), 1, w.sources);
  ASSERT_EQ(r1.rows.size(), 2u);  // rank 0's tokens 0 (expert 5) and 1 (experts 6 and 7, once)
  EXPECT_THAT(r1.recv_topk_idx, ElementsAre(-1, 1, -1, 2, 3, -1));
  EXPECT_THAT(r1.tokens_per_expert, ElementsAre(0, 1, 1, 1));
  EXPECT_EQ(rank_packed_rows(shape(), 1, w.sources), 2);
}

TEST(HighThroughputReference, ExpertContiguousSegmentsStartAligned) {
  TwoRanks w;
  const ExpertContiguousReceive packed = dispatch_expert_contiguous(shape(1), 0, w.sources);
  EXPECT_THAT(packed.tokens_per_expert, ElementsAre(1, 2, 1, 1));
  EXPECT_THAT(packed.segment_start, ElementsAre(0, 1, 3, 4, 5));
  EXPECT_THAT(packed.row_expert, ElementsAre(0, 1, 1, 2, 3));
  EXPECT_THAT(packed.row_weight, ElementsAre(0.25f, 0.5f, 0.5f, 0.5f, 0.25f));
  EXPECT_EQ(packed.rows[1].source_rank, 0u);  // expert 1: rank 0's token 0, then rank 1's token 0
  EXPECT_EQ(packed.rows[2].source_rank, 1u);

  const ExpertContiguousReceive aligned = dispatch_expert_contiguous(shape(4), 0, w.sources);
  EXPECT_THAT(aligned.segment_start, ElementsAre(0, 4, 8, 12, 16));
  EXPECT_THAT(aligned.row_expert, ElementsAre(0, -1, -1, -1, 1, 1, -1, -1, 2, -1, -1, -1, 3, -1, -1, -1));
  EXPECT_EQ(aligned.row_weight[1], 0.0f);
  EXPECT_EQ(aligned.rows[1].x, nullptr);  // padding holds no token
  EXPECT_EQ(expert_contiguous_rows(shape(4), 0, w.sources), 16);
  EXPECT_EQ(expert_contiguous_rows(shape(128), 1, w.sources), 3 * 128);  // experts 5, 6, 7; expert 4 empty
}

TEST(HighThroughputReference, AllTokensToOneExpertAndARankThatReceivesNothing) {
  Tokens a{{2, -1, -1, 2, -1, -1, 2, -1, -1}, {1, 0, 0, 1, 0, 0, 1, 0, 0}, {}, {}};
  Tokens b{{-1, 2, -1}, {0, 1, 0}, {}, {}};
  std::vector<RankTokens> sources{a.view(1), b.view(2)};
  EXPECT_THAT(dispatch_rank_packed(shape(), 0, sources).tokens_per_expert, ElementsAre(0, 0, 4, 0));
  EXPECT_TRUE(dispatch_rank_packed(shape(), 1, sources).rows.empty());
  EXPECT_THAT(dispatch_expert_contiguous(shape(128), 0, sources).segment_start, ElementsAre(0, 0, 0, 128, 128));
  EXPECT_THAT(dispatch_expert_contiguous(shape(128), 1, sources).segment_start, ElementsAre(0, 0, 0, 0, 0));
}

TEST(HighThroughputReference, RankPackedCombineSumsEachRanksRowInRankOrder) {
  TwoRanks w;
  // Rank r's row for token (s, t): the value 100 r + 10 s + t in every element.
  std::vector<std::vector<float>> rows;
  const RankRowFn row = [&](uint32_t r, uint32_t s, uint32_t t) {
    rows.push_back(std::vector<float>(2, float(100 * r + 10 * s + t)));
    return rows.back().data();
  };
  std::vector<float> out(4, -1.0f);
  combine_rank_packed(shape(), 0, w.sources, 2, row, out.data());
  EXPECT_THAT(out, ElementsAre(0 + 100, 0 + 100, 1 + 101, 1 + 101));  // both tokens reached both ranks
  std::vector<float> out1(4, -1.0f);
  combine_rank_packed(shape(), 1, w.sources, 2, row, out1.data());
  EXPECT_THAT(out1, ElementsAre(10, 10, 0, 0));  // token 1 named no expert: zeros
}

TEST(HighThroughputReference, ExpertContiguousCombineWeightsPartialSumsAndRoundsThemToTheRowType) {
  TwoRanks w;
  // Every expert outputs 1 + 2^-10 for every token, which bf16 (8 bits of mantissa) cannot hold: the partial sums
  // rounded to bf16 before they travel differ from the float32 ones.
  const float value = 1.0f + 1.0f / 1024.0f;
  const std::vector<float> row(1, value);
  const ExpertRowFn expert_row = [&](uint32_t, uint32_t, uint32_t, uint32_t) { return row.data(); };
  std::vector<float> exact(2), rounded(2);
  combine_expert_contiguous(shape(), 0, w.sources, 1, ScalarType::kFloat32, expert_row, exact.data());
  combine_expert_contiguous(shape(), 0, w.sources, 1, ScalarType::kBFloat16, expert_row, rounded.data());
  // Token 0: expert 1 on rank 0 (weight 0.5), expert 5 on rank 1 (0.25). Token 1: 2 on rank 0 (0.5), 6 and 7 on
  // rank 1 (0.125 + 0.375).
  EXPECT_FLOAT_EQ(exact[0], 0.75f * value);
  EXPECT_FLOAT_EQ(exact[1], 1.0f * value);
  const float bf16_half = bf16_to_float(float_to_bf16(0.5f * value));
  const float bf16_quarter = bf16_to_float(float_to_bf16(0.25f * value));
  EXPECT_EQ(rounded[0], bf16_half + bf16_quarter);
  EXPECT_NE(rounded[0], exact[0]);
}

TEST(HighThroughputReference, BadRoutingIsRefusedNamingTheSlot) {
  TwoRanks w;
  w.t0.idx[4] = 8;
  EXPECT_THAT(config_error_message([&] { dispatch_rank_packed(shape(), 0, w.sources); }),
              HasSubstr("rank 0, token 1, slot 1: expert index 8 is outside [-1, num_experts=8)"));
  w.t0.idx[4] = -2;
  EXPECT_THAT(config_error_message([&] { dispatch_expert_contiguous(shape(), 0, w.sources); }),
              HasSubstr("expert index -2 is outside [-1, num_experts=8)"));
  w.t0.idx[4] = 6;
  EXPECT_THAT(config_error_message([&] { dispatch_rank_packed(shape(), 0, w.sources); }),
              HasSubstr("rank 0, token 1, slot 1: expert index 6 repeats the expert of slot 0"));
  w.t0.idx[4] = 7;
  w.sources[1].m = 5;
  EXPECT_THAT(config_error_message([&] { dispatch_rank_packed(shape(), 0, w.sources); }),
              HasSubstr("rank 1: m=5 is outside [0, max_tokens_per_rank=4]"));
}

TEST(HighThroughputReference, ShapeIsValidated) {
  HighThroughputShape bad = shape();
  bad.num_experts = 7;
  EXPECT_EQ(config_error_message([&] { bad.validate(); }),
            "HighThroughputShape.num_experts must be divisible by world_size=2, got 7");
  bad = shape(0);
  EXPECT_EQ(config_error_message([&] { bad.validate(); }), "HighThroughputShape.expert_alignment must be > 0, got 0");
}

}  // namespace
}  // namespace expertwire::reference
