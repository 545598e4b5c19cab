// The CPU reference model on hand-made cases. Expected inboxes and combine outputs are written out by hand,
// so these tests check the oracle itself rather than restating its code.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/error.h"
#include "expertwire/config.h"
#include "reference/reference.h"
#include "tests/unit/config_error.h"

namespace expertwire::reference {
namespace {

using ::testing::HasSubstr;
using Key = std::pair<uint32_t, uint32_t>;  // (source group, token)
using Keys = std::vector<Key>;

constexpr float kPoison = -777.25f;  // exactly representable, and no test output produces it

// One DP group's inputs, owning its storage. Payload and scale bytes are distinct per (group, token) so a
// pointer at the wrong row would also read wrong bytes.
struct OwnedGroup {
  int64_t m = 0;
  std::vector<uint8_t> x;
  std::vector<uint8_t> x_scale;
  std::vector<uint32_t> indices;
  std::vector<float> weights;

  GroupInput view() const {
    GroupInput input;
    input.m = m;
    input.x = x.empty() ? nullptr : x.data();
    input.x_scale = x_scale.empty() ? nullptr : x_scale.data();
    input.indices = indices.empty() ? nullptr : indices.data();
    input.weights = weights.empty() ? nullptr : weights.data();
    return input;
  }
};

OwnedGroup make_group(const AllToAllConfig& config, uint32_t group, const std::vector<std::vector<uint32_t>>& rows,
                      const std::vector<std::vector<float>>& weights = {}) {
  OwnedGroup owned;
  owned.m = int64_t(rows.size());
  for (size_t t = 0; t < rows.size(); ++t) {
    for (int64_t b = 0; b < config.hidden_dim_bytes; ++b) owned.x.push_back(uint8_t(group * 64 + t * 8 + b % 8));
    for (int64_t b = 0; b < config.hidden_dim_scale_bytes; ++b) {
      owned.x_scale.push_back(uint8_t(200 + group * 16 + t));
    }
    EXPECT_EQ(int64_t(rows[t].size()), config.experts_per_token) << "test input: row " << t;
    owned.indices.insert(owned.indices.end(), rows[t].begin(), rows[t].end());
    if (!weights.empty()) owned.weights.insert(owned.weights.end(), weights[t].begin(), weights[t].end());
  }
  return owned;
}

std::vector<GroupInput> views(const std::vector<OwnedGroup>& groups) {
  std::vector<GroupInput> out;
  for (const OwnedGroup& group : groups) out.push_back(group.view());
  return out;
}

Keys keys_of(const ExpertInbox& inbox) {
  Keys keys;
  for (const ReceivedToken& token : inbox.tokens) keys.emplace_back(token.source_group, token.token);
  return keys;
}

// Each received token must point at its own row of its own group's input.
void expect_rows_point_into_inputs(const AllToAllConfig& config, const std::vector<OwnedGroup>& groups,
                                   const std::vector<ExpertInbox>& inboxes) {
  for (size_t le = 0; le < inboxes.size(); ++le) {
    for (const ReceivedToken& token : inboxes[le].tokens) {
      ASSERT_LT(token.source_group, groups.size());
      const OwnedGroup& group = groups[token.source_group];
      EXPECT_EQ(token.x, group.x.data() + token.token * config.hidden_dim_bytes)
          << "local expert " << le << " group " << token.source_group << " token " << token.token;
      if (config.hidden_dim_scale_bytes == 0) {
        EXPECT_EQ(token.x_scale, nullptr);
      } else {
        EXPECT_EQ(token.x_scale, group.x_scale.data() + token.token * config.hidden_dim_scale_bytes)
            << "local expert " << le << " group " << token.source_group << " token " << token.token;
      }
    }
  }
}

// Expert outputs keyed by (expert, group, token); a lookup of a row the test did not provide is a failure.
class ExpertOutputs {
 public:
  void set(uint32_t expert, uint32_t group, uint32_t token, std::vector<float> row) {
    rows_[{expert, group, token}] = std::move(row);
  }
  ExpertOutputFn fn() const {
    return [this](uint32_t expert, uint32_t group, uint32_t token) -> const float* {
      const auto it = rows_.find({expert, group, token});
      if (it == rows_.end()) {
        ADD_FAILURE() << "combine asked for an output nobody produced: expert " << expert << " group " << group
                      << " token " << token;
        return nullptr;
      }
      return it->second.data();
    };
  }

 private:
  std::map<std::tuple<uint32_t, uint32_t, uint32_t>, std::vector<float>> rows_;
};

std::vector<float> row_of(const std::vector<float>& out, int64_t token, int64_t hidden_dim) {
  return std::vector<float>(out.begin() + token * hidden_dim, out.begin() + (token + 1) * hidden_dim);
}

// ---------------------------------------------------------------------------------------------------------
// dispatch

TEST(ReferenceDispatch, ZeroTokens) {
  // 4 experts over 2 ranks, every group empty.
  const AllToAllConfig config = make_config(4, 4, 2, 0, 2, 1, 8, 16, 4);
  const std::vector<OwnedGroup> groups = {make_group(config, 0, {}), make_group(config, 1, {})};
  for (int64_t rank = 0; rank < 2; ++rank) {
    AllToAllConfig on_rank = config;
    on_rank.rank = rank;
    const std::vector<ExpertInbox> inboxes = dispatch(on_rank, views(groups));
    ASSERT_EQ(inboxes.size(), 2u);
    EXPECT_TRUE(inboxes[0].tokens.empty());
    EXPECT_TRUE(inboxes[1].tokens.empty());
  }
}

TEST(ReferenceDispatch, ZeroTokensWithNullPointers) {
  // With m = 0 nothing is read, so null arrays are fine.
  const AllToAllConfig config = make_config(4, 2, 1, 0, 1, 1, 8, 16, 4);
  const std::vector<ExpertInbox> inboxes = dispatch(config, {GroupInput{}});
  ASSERT_EQ(inboxes.size(), 2u);
  EXPECT_TRUE(inboxes[0].tokens.empty());
  EXPECT_TRUE(inboxes[1].tokens.empty());
}

TEST(ReferenceDispatch, FullBatchOnOneRank) {
  // m = max_num_tokens = 3, one rank holding all 4 experts, no scales.
  const AllToAllConfig config = make_config(3, 4, 2, 0, 1, 1, 8, 16, 0);
  const std::vector<OwnedGroup> groups = {make_group(config, 0, {{0, 1}, {3, 2}, {1, 3}})};
  const std::vector<ExpertInbox> inboxes = dispatch(config, views(groups));
  ASSERT_EQ(inboxes.size(), 4u);
  EXPECT_EQ(keys_of(inboxes[0]), (Keys{{0, 0}}));
  EXPECT_EQ(keys_of(inboxes[1]), (Keys{{0, 0}, {0, 2}}));
  EXPECT_EQ(keys_of(inboxes[2]), (Keys{{0, 1}}));
  EXPECT_EQ(keys_of(inboxes[3]), (Keys{{0, 1}, {0, 2}}));

  const uint8_t* x = groups[0].x.data();
  EXPECT_EQ(inboxes[3].tokens[1].x, x + 32);  // token 2 * 16 bytes
  EXPECT_EQ(inboxes[3].tokens[1].x_scale, nullptr);
  EXPECT_EQ(inboxes[3].tokens[1].x[0], 16);  // make_group: group 0 * 64 + token 2 * 8 + 0
  expect_rows_point_into_inputs(config, groups, inboxes);
}

TEST(ReferenceDispatch, SingleExpert) {
  const AllToAllConfig config = make_config(2, 1, 1, 0, 1, 1, 8, 16, 4);
  const std::vector<OwnedGroup> groups = {make_group(config, 0, {{0}, {0}})};
  const std::vector<ExpertInbox> inboxes = dispatch(config, views(groups));
  ASSERT_EQ(inboxes.size(), 1u);
  EXPECT_EQ(keys_of(inboxes[0]), (Keys{{0, 0}, {0, 1}}));
  EXPECT_EQ(inboxes[0].tokens[0].x, groups[0].x.data());
  EXPECT_EQ(inboxes[0].tokens[1].x, groups[0].x.data() + 16);
  EXPECT_EQ(inboxes[0].tokens[0].x_scale, groups[0].x_scale.data());
  EXPECT_EQ(inboxes[0].tokens[1].x_scale, groups[0].x_scale.data() + 4);
  EXPECT_EQ(inboxes[0].tokens[1].x_scale[0], 201);  // make_group: 200 + group 0 * 16 + token 1
}

TEST(ReferenceDispatch, AllTokensToOneExpert) {
  // 4 experts over 2 ranks (2 local each); every token picks expert 3 = rank 1, local expert 1.
  const AllToAllConfig config = make_config(4, 4, 1, 0, 2, 1, 8, 16, 0);
  const std::vector<OwnedGroup> groups = {make_group(config, 0, {{3}, {3}, {3}, {3}}),
                                          make_group(config, 1, {{3}, {3}})};
  const std::vector<ExpertInbox> rank0 = dispatch(config, views(groups));
  ASSERT_EQ(rank0.size(), 2u);
  EXPECT_TRUE(rank0[0].tokens.empty());
  EXPECT_TRUE(rank0[1].tokens.empty());

  AllToAllConfig on_rank1 = config;
  on_rank1.rank = 1;
  const std::vector<ExpertInbox> rank1 = dispatch(on_rank1, views(groups));
  ASSERT_EQ(rank1.size(), 2u);
  EXPECT_TRUE(rank1[0].tokens.empty());
  EXPECT_EQ(keys_of(rank1[1]), (Keys{{0, 0}, {0, 1}, {0, 2}, {0, 3}, {1, 0}, {1, 1}}));
  expect_rows_point_into_inputs(on_rank1, groups, rank1);
}

// 4 ranks in 2 DP groups of 2, one expert per rank (expert e on rank e), top-2, scales present.
AllToAllConfig dp2_config(int64_t rank) { return make_config(3, 4, 2, rank, 4, 2, 8, 16, 8); }

std::vector<OwnedGroup> dp2_groups(const AllToAllConfig& config) {
  return {
      make_group(config, 0, {{0, 3}, {3, 1}}, {{0.5f, 2.0f}, {-1.0f, 0.25f}}),
      make_group(config, 1, {{3, 2}, {0, 1}, {2, 3}}, {{1.0f, 1.0f}, {2.0f, -0.5f}, {0.5f, 0.5f}}),
  };
}

TEST(ReferenceDispatch, TwoDataParallelGroups) {
  const std::vector<OwnedGroup> groups = dp2_groups(dp2_config(0));
  const std::vector<Keys> expected_by_rank = {
      {{0, 0}, {1, 1}},                  // expert 0: group 0 token 0, group 1 token 1
      {{0, 1}, {1, 1}},                  // expert 1: group 0 token 1, group 1 token 1
      {{1, 0}, {1, 2}},                  // expert 2: group 1 tokens 0 and 2
      {{0, 0}, {0, 1}, {1, 0}, {1, 2}},  // expert 3: both tokens of group 0, tokens 0 and 2 of group 1
  };
  for (int64_t rank = 0; rank < 4; ++rank) {
    SCOPED_TRACE("rank " + std::to_string(rank));
    const AllToAllConfig config = dp2_config(rank);
    const std::vector<ExpertInbox> inboxes = dispatch(config, views(groups));
    ASSERT_EQ(inboxes.size(), 1u);
    EXPECT_EQ(keys_of(inboxes[0]), expected_by_rank[size_t(rank)]);
    expect_rows_point_into_inputs(config, groups, inboxes);
  }
  // Group 1 token 2 on rank 3 reads group 1's third row: x at 2 * 16, scales at 2 * 8.
  const std::vector<ExpertInbox> rank3 = dispatch(dp2_config(3), views(groups));
  EXPECT_EQ(rank3[0].tokens[3].x, groups[1].x.data() + 32);
  EXPECT_EQ(rank3[0].tokens[3].x_scale, groups[1].x_scale.data() + 16);
  EXPECT_EQ(rank3[0].tokens[3].x[0], 80);         // 1 * 64 + 2 * 8
  EXPECT_EQ(rank3[0].tokens[3].x_scale[0], 218);  // 200 + 1 * 16 + 2
}

TEST(ReferenceDispatch, TokensSpreadAcrossRanks) {
  // 6 experts over 3 ranks (experts 2r and 2r + 1 on rank r), dp 1 so every rank is its own group.
  const AllToAllConfig base = make_config(3, 6, 2, 0, 3, 1, 8, 16, 8);
  const std::vector<OwnedGroup> groups = {
      make_group(base, 0, {{0, 5}, {2, 3}, {4, 1}}),
      make_group(base, 1, {{1, 2}}),
      make_group(base, 2, {{5, 4}, {3, 0}}),
  };
  const std::vector<std::vector<Keys>> expected = {
      // rank 0: expert 0, expert 1
      {{{0, 0}, {2, 1}}, {{0, 2}, {1, 0}}},
      // rank 1: expert 2, expert 3
      {{{0, 1}, {1, 0}}, {{0, 1}, {2, 1}}},
      // rank 2: expert 4, expert 5
      {{{0, 2}, {2, 0}}, {{0, 0}, {2, 0}}},
  };
  size_t delivered = 0;
  for (int64_t rank = 0; rank < 3; ++rank) {
    SCOPED_TRACE("rank " + std::to_string(rank));
    AllToAllConfig config = base;
    config.rank = rank;
    const std::vector<ExpertInbox> inboxes = dispatch(config, views(groups));
    ASSERT_EQ(inboxes.size(), 2u);
    EXPECT_EQ(keys_of(inboxes[0]), expected[size_t(rank)][0]);
    EXPECT_EQ(keys_of(inboxes[1]), expected[size_t(rank)][1]);
    expect_rows_point_into_inputs(config, groups, inboxes);
    delivered += inboxes[0].tokens.size() + inboxes[1].tokens.size();
  }
  EXPECT_EQ(delivered, 12u);  // (3 + 1 + 2) tokens * top-2

  // Rank 2, expert 5 (local 1), second row: group 2 token 0 -> x at group 2's row 0.
  AllToAllConfig rank2 = base;
  rank2.rank = 2;
  const std::vector<ExpertInbox> inboxes = dispatch(rank2, views(groups));
  EXPECT_EQ(inboxes[1].tokens[1].x, groups[2].x.data());
  EXPECT_EQ(inboxes[1].tokens[1].x_scale, groups[2].x_scale.data());
  EXPECT_EQ(inboxes[1].tokens[1].x[3], 131);  // 2 * 64 + 0 * 8 + 3
  // Rank 0, expert 0 (local 0), second row: group 2 token 1.
  rank2.rank = 0;
  const std::vector<ExpertInbox> rank0 = dispatch(rank2, views(groups));
  EXPECT_EQ(rank0[0].tokens[1].x, groups[2].x.data() + 16);
  EXPECT_EQ(rank0[0].tokens[1].x_scale, groups[2].x_scale.data() + 8);
}

// ---------------------------------------------------------------------------------------------------------
// dispatch: invalid input

TEST(ReferenceDispatchErrors, ExpertIndexOutOfRange) {
  const AllToAllConfig config = make_config(3, 6, 2, 0, 3, 1, 8, 16, 0);
  const std::vector<OwnedGroup> groups = {make_group(config, 0, {{0, 1}}), make_group(config, 1, {{2, 6}}),
                                          make_group(config, 2, {})};
  const std::string message = config_error_message([&] { dispatch(config, views(groups)); });
  EXPECT_THAT(message, HasSubstr("group 1, token 0, k 1"));
  EXPECT_THAT(message, HasSubstr("expert index 6"));
  EXPECT_THAT(message, HasSubstr("num_experts=6"));
}

TEST(ReferenceDispatchErrors, HugeExpertIndex) {
  const AllToAllConfig config = make_config(3, 6, 2, 0, 3, 1, 8, 16, 0);
  const std::vector<OwnedGroup> groups = {make_group(config, 0, {}), make_group(config, 1, {}),
                                          make_group(config, 2, {{1, 2}, {0xFFFFFFFEu, 3}})};
  const std::string message = config_error_message([&] { dispatch(config, views(groups)); });
  EXPECT_THAT(message, HasSubstr("group 2, token 1, k 0"));
  EXPECT_THAT(message, HasSubstr("expert index 4294967294"));
}

TEST(ReferenceDispatch, NoExpertSlotsDeliverNothing) {
  // 6 experts over 3 ranks (2 each); kNoExpert in one slot of a row, and in both slots of another.
  const AllToAllConfig config = make_config(3, 6, 2, 0, 3, 1, 8, 16, 0);
  const std::vector<OwnedGroup> groups = {make_group(config, 0, {{kNoExpert, 1}, {kNoExpert, kNoExpert}}),
                                          make_group(config, 1, {{0, kNoExpert}}), make_group(config, 2, {})};
  const std::vector<ExpertInbox> inboxes = dispatch(config, views(groups));
  ASSERT_EQ(inboxes.size(), 2u);
  ASSERT_EQ(inboxes[0].tokens.size(), 1u);  // expert 0: group 1's token 0
  EXPECT_EQ(inboxes[0].tokens[0].source_group, 1u);
  EXPECT_EQ(inboxes[0].tokens[0].token, 0u);
  ASSERT_EQ(inboxes[1].tokens.size(), 1u);  // expert 1: group 0's token 0
  EXPECT_EQ(inboxes[1].tokens[0].source_group, 0u);
  EXPECT_EQ(inboxes[1].tokens[0].token, 0u);
}

TEST(ReferenceDispatchErrors, RepeatedExpertInRow) {
  const AllToAllConfig config = make_config(3, 6, 3, 0, 3, 1, 8, 16, 0);
  const std::vector<OwnedGroup> groups = {make_group(config, 0, {{0, 1, 2}, {3, 4, 5}, {4, 0, 4}}),
                                          make_group(config, 1, {}), make_group(config, 2, {})};
  const std::string message = config_error_message([&] { dispatch(config, views(groups)); });
  EXPECT_THAT(message, HasSubstr("group 0, token 2, k 2"));
  EXPECT_THAT(message, HasSubstr("expert index 4 repeats the expert at k 0"));
}

TEST(ReferenceDispatchErrors, SameExpertInDifferentRowsIsFine) {
  const AllToAllConfig config = make_config(3, 6, 2, 0, 3, 1, 8, 16, 0);
  const std::vector<OwnedGroup> groups = {make_group(config, 0, {{0, 1}, {1, 0}}), make_group(config, 1, {{0, 1}}),
                                          make_group(config, 2, {})};
  const std::vector<ExpertInbox> inboxes = dispatch(config, views(groups));
  EXPECT_EQ(keys_of(inboxes[0]), (Keys{{0, 0}, {0, 1}, {1, 0}}));
  EXPECT_EQ(keys_of(inboxes[1]), (Keys{{0, 0}, {0, 1}, {1, 0}}));
}

TEST(ReferenceDispatchErrors, TooManyTokens) {
  const AllToAllConfig config = make_config(3, 6, 1, 0, 3, 1, 8, 16, 0);
  const std::vector<OwnedGroup> groups = {make_group(config, 0, {}), make_group(config, 1, {{0}, {1}, {2}, {3}, {4}}),
                                          make_group(config, 2, {})};
  const std::string message = config_error_message([&] { dispatch(config, views(groups)); });
  EXPECT_THAT(message, HasSubstr("group 1"));
  EXPECT_THAT(message, HasSubstr("m=5"));
  EXPECT_THAT(message, HasSubstr("max_num_tokens=3"));
}

TEST(ReferenceDispatchErrors, NegativeTokenCount) {
  const AllToAllConfig config = make_config(3, 6, 1, 0, 3, 1, 8, 16, 0);
  std::vector<GroupInput> inputs(3);
  inputs[2].m = -1;
  const std::string message = config_error_message([&] { dispatch(config, inputs); });
  EXPECT_THAT(message, HasSubstr("group 2"));
  EXPECT_THAT(message, HasSubstr("m=-1"));
}

TEST(ReferenceDispatchErrors, WrongNumberOfGroups) {
  const AllToAllConfig config = make_config(3, 6, 1, 0, 3, 1, 8, 16, 0);  // 3 ranks / dp 1 = 3 groups
  const std::vector<OwnedGroup> groups = {make_group(config, 0, {{0}}), make_group(config, 1, {{1}})};
  const std::string message = config_error_message([&] { dispatch(config, views(groups)); });
  EXPECT_THAT(message, HasSubstr("got 2 groups"));
  EXPECT_THAT(message, HasSubstr("num_dp_groups=3"));
}

TEST(ReferenceDispatchErrors, InvalidConfig) {
  const AllToAllConfig config = make_config(3, 6, 1, 3, 3, 1, 8, 16, 0);  // rank == world_size
  const std::string message = config_error_message([&] { dispatch(config, std::vector<GroupInput>(3)); });
  EXPECT_THAT(message, HasSubstr("AllToAllConfig.rank"));
}

// ---------------------------------------------------------------------------------------------------------
// combine

TEST(ReferenceCombine, ZeroTokensLeavesOutputUntouched) {
  const AllToAllConfig config = make_config(4, 4, 2, 0, 2, 1, 8, 16, 0);
  const OwnedGroup group = make_group(config, 0, {});
  std::vector<float> out(4 * 8, kPoison);
  const ExpertOutputs outputs;  // empty: any lookup fails the test
  combine(config, 0, group.view(), outputs.fn(), out.data());
  for (float value : out) EXPECT_EQ(value, kPoison);
}

TEST(ReferenceCombine, SingleExpert) {
  const AllToAllConfig config = make_config(2, 1, 1, 0, 1, 1, 8, 16, 0);
  const OwnedGroup group = make_group(config, 0, {{0}, {0}}, {{0.5f}, {2.0f}});
  ExpertOutputs outputs;
  outputs.set(0, 0, 0, {1, 2, 3, 4, 5, 6, 7, 8});
  outputs.set(0, 0, 1, {-1, 0, 1, 2, -2, 0.5f, 0.25f, 8});
  std::vector<float> out(2 * 8, kPoison);
  combine(config, 0, group.view(), outputs.fn(), out.data());
  EXPECT_EQ(row_of(out, 0, 8), (std::vector<float>{0.5f, 1, 1.5f, 2, 2.5f, 3, 3.5f, 4}));  // 0.5 * row
  EXPECT_EQ(row_of(out, 1, 8), (std::vector<float>{-2, 0, 2, 4, -4, 1, 0.5f, 16}));        // 2 * row
}

TEST(ReferenceCombine, FullBatchTwoExperts) {
  // m = max_num_tokens = 2, top-2 over 4 experts on one rank.
  const AllToAllConfig config = make_config(2, 4, 2, 0, 1, 1, 8, 16, 0);
  const OwnedGroup group = make_group(config, 0, {{2, 0}, {1, 3}}, {{2.0f, -1.0f}, {0.5f, 0.5f}});
  ExpertOutputs outputs;
  outputs.set(2, 0, 0, {1, 1, 1, 1, 0.5f, 0.5f, 0.5f, 0.5f});
  outputs.set(0, 0, 0, {0, 1, 2, 3, 4, 5, 6, 7});
  outputs.set(1, 0, 1, {2, 4, 6, 8, -2, -4, -6, -8});
  outputs.set(3, 0, 1, {0, 0, 0, 0, 1, 1, 1, 1});
  std::vector<float> out(2 * 8, kPoison);
  combine(config, 0, group.view(), outputs.fn(), out.data());
  // 2 * 1 - 1 * {0..3} and 2 * 0.5 - 1 * {4..7}
  EXPECT_EQ(row_of(out, 0, 8), (std::vector<float>{2, 1, 0, -1, -3, -4, -5, -6}));
  // 0.5 * {2, 4, 6, 8} + 0 and 0.5 * {-2, -4, -6, -8} + 0.5
  EXPECT_EQ(row_of(out, 1, 8), (std::vector<float>{1, 2, 3, 4, -0.5f, -1.5f, -2.5f, -3.5f}));
}

TEST(ReferenceCombine, TwoDataParallelGroups) {
  const AllToAllConfig config = dp2_config(0);
  const std::vector<OwnedGroup> groups = dp2_groups(config);
  ExpertOutputs outputs;
  // Group 0
  outputs.set(0, 0, 0, {1, 2, 3, 4, 5, 6, 7, 8});
  outputs.set(3, 0, 0, {0.5f, 0.5f, 0.5f, 0.5f, -1, -1, -1, -1});
  outputs.set(3, 0, 1, {2, -2, 4, -4, 0, 1, -1, 8});
  outputs.set(1, 0, 1, {4, 4, 4, 4, 8, 8, 8, 8});
  // Group 1: the same (expert, token) pairs as group 0 carry different values, so a mixed-up group shows.
  outputs.set(3, 1, 0, {1, 1, 1, 1, 1, 1, 1, 1});
  outputs.set(2, 1, 0, {0, 1, 2, 3, 4, 5, 6, 7});
  outputs.set(0, 1, 1, {0.25f, 0.5f, 0.75f, 1, -0.25f, -0.5f, -0.75f, -1});
  outputs.set(1, 1, 1, {2, 2, 2, 2, 2, 2, 2, 2});
  outputs.set(2, 1, 2, {3, 3, 3, 3, 3, 3, 3, 3});
  outputs.set(3, 1, 2, {1, -1, 1, -1, 1, -1, 1, -1});

  std::vector<float> out0(3 * 8, kPoison);
  combine(config, 0, groups[0].view(), outputs.fn(), out0.data());
  // t0: 0.5 * {1..8} + 2 * {0.5 x4, -1 x4}
  EXPECT_EQ(row_of(out0, 0, 8), (std::vector<float>{1.5f, 2, 2.5f, 3, 0.5f, 1, 1.5f, 2}));
  // t1: -1 * {2, -2, 4, -4, 0, 1, -1, 8} + 0.25 * {4 x4, 8 x4}
  EXPECT_EQ(row_of(out0, 1, 8), (std::vector<float>{-1, 3, -3, 5, 2, 1, 3, -6}));
  // Group 0 has m = 2 < max_num_tokens = 3: row 2 stays untouched.
  EXPECT_EQ(row_of(out0, 2, 8), std::vector<float>(8, kPoison));

  std::vector<float> out1(3 * 8, kPoison);
  combine(config, 1, groups[1].view(), outputs.fn(), out1.data());
  // t0: {1 x8} + {0..7}
  EXPECT_EQ(row_of(out1, 0, 8), (std::vector<float>{1, 2, 3, 4, 5, 6, 7, 8}));
  // t1: 2 * {0.25, 0.5, 0.75, 1, -0.25, -0.5, -0.75, -1} - 0.5 * {2 x8}
  EXPECT_EQ(row_of(out1, 1, 8), (std::vector<float>{-0.5f, 0, 0.5f, 1, -1.5f, -2, -2.5f, -3}));
  // t2: 0.5 * 3 + 0.5 * (+-1)
  EXPECT_EQ(row_of(out1, 2, 8), (std::vector<float>{2, 1, 2, 1, 2, 1, 2, 1}));
}

TEST(ReferenceCombine, AccumulatesInFloatInKOrder) {
  // 1 + 2^24 rounds back to 2^24 in fp32 (ties to even), so k order {1, 2^24, -2^24} sums to 0. A double
  // accumulator would give 1, and the reversed order {-2^24, 2^24, 1} gives 1.
  const AllToAllConfig config = make_config(2, 3, 3, 0, 1, 1, 8, 16, 0);
  const OwnedGroup group = make_group(config, 0, {{0, 1, 2}, {2, 1, 0}}, {{1, 1, 1}, {1, 1, 1}});
  ExpertOutputs outputs;
  for (uint32_t token = 0; token < 2; ++token) {
    outputs.set(0, 0, token, std::vector<float>(8, 1.0f));
    outputs.set(1, 0, token, std::vector<float>(8, 16777216.0f));
    outputs.set(2, 0, token, std::vector<float>(8, -16777216.0f));
  }
  std::vector<float> out(2 * 8, kPoison);
  combine(config, 0, group.view(), outputs.fn(), out.data());
  EXPECT_EQ(row_of(out, 0, 8), std::vector<float>(8, 0.0f));
  EXPECT_EQ(row_of(out, 1, 8), std::vector<float>(8, 1.0f));
}

TEST(ReferenceCombineErrors, ExpertIndexOutOfRange) {
  const AllToAllConfig config = make_config(2, 4, 2, 0, 1, 1, 8, 16, 0);
  const OwnedGroup group = make_group(config, 0, {{0, 1}, {4, 2}}, {{1, 1}, {1, 1}});
  std::vector<float> out(2 * 8, kPoison);
  const ExpertOutputs outputs;
  const std::string message = config_error_message([&] { combine(config, 0, group.view(), outputs.fn(), out.data()); });
  EXPECT_THAT(message, HasSubstr("group 0, token 1, k 0"));
  EXPECT_THAT(message, HasSubstr("expert index 4"));
  EXPECT_THAT(message, HasSubstr("num_experts=4"));
  for (float value : out) EXPECT_EQ(value, kPoison);  // validated before anything is written
}

TEST(ReferenceCombineErrors, RepeatedExpertInRow) {
  const AllToAllConfig config = make_config(2, 4, 2, 0, 1, 1, 8, 16, 0);
  const OwnedGroup group = make_group(config, 0, {{3, 3}}, {{1, 1}});
  std::vector<float> out(2 * 8, kPoison);
  const ExpertOutputs outputs;
  const std::string message = config_error_message([&] { combine(config, 0, group.view(), outputs.fn(), out.data()); });
  EXPECT_THAT(message, HasSubstr("group 0, token 0, k 1"));
  EXPECT_THAT(message, HasSubstr("expert index 3 repeats the expert at k 0"));
}

TEST(ReferenceCombineErrors, TooManyTokens) {
  const AllToAllConfig config = make_config(2, 4, 1, 0, 1, 1, 8, 16, 0);
  const OwnedGroup group = make_group(config, 0, {{0}, {1}, {2}}, {{1}, {1}, {1}});
  std::vector<float> out(3 * 8, kPoison);
  const ExpertOutputs outputs;
  const std::string message = config_error_message([&] { combine(config, 0, group.view(), outputs.fn(), out.data()); });
  EXPECT_THAT(message, HasSubstr("m=3"));
  EXPECT_THAT(message, HasSubstr("max_num_tokens=2"));
}

TEST(ReferenceCombineErrors, GroupOutOfRange) {
  const AllToAllConfig config = dp2_config(0);  // 2 groups
  const std::vector<OwnedGroup> groups = dp2_groups(config);
  std::vector<float> out(3 * 8, kPoison);
  const ExpertOutputs outputs;
  const std::string message =
      config_error_message([&] { combine(config, 2, groups[1].view(), outputs.fn(), out.data()); });
  EXPECT_THAT(message, HasSubstr("group 2"));
  EXPECT_THAT(message, HasSubstr("num_dp_groups=2"));
}

// ---------------------------------------------------------------------------------------------------------
// 16-bit conversions

constexpr float kInf = std::numeric_limits<float>::infinity();

TEST(Bf16, KnownValues) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(float_to_bf16(-2.0f), 0xC000);
  EXPECT_EQ(float_to_bf16(0.0f), 0x0000);
  EXPECT_EQ(float_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(float_to_bf16(0.1f), 0x3DCD);  // 0x3DCCCCCD: low half 0xCCCD > 0x8000 rounds up
  EXPECT_EQ(bf16_to_float(0x3F80), 1.0f);
  EXPECT_EQ(bf16_to_float(0xC000), -2.0f);
  EXPECT_EQ(bf16_to_float(0x3FC0), 1.5f);
  EXPECT_EQ(float_bits(bf16_to_float(0x8000)), 0x80000000u);  // -0 keeps its sign
}

TEST(Bf16, RoundToNearestEven) {
  EXPECT_EQ(float_to_bf16(float_from_bits(0x3F808000)), 0x3F80);  // 1 + 2^-8: tie, 0x3F80 is even -> down
  EXPECT_EQ(float_to_bf16(float_from_bits(0x3F818000)), 0x3F82);  // 1 + 3 * 2^-8: tie, 0x3F81 is odd -> up
  EXPECT_EQ(float_to_bf16(float_from_bits(0x3F808001)), 0x3F81);  // just above the tie -> up
  EXPECT_EQ(float_to_bf16(float_from_bits(0x3F807FFF)), 0x3F80);  // just below the tie -> down
  EXPECT_EQ(float_to_bf16(float_from_bits(0xBF818000)), 0xBF82);  // negative tie, odd -> away from zero
  EXPECT_EQ(float_to_bf16(float_from_bits(0x3F7FFFFF)), 0x3F80);  // mantissa carry bumps the exponent to 1.0
  EXPECT_EQ(float_to_bf16(float_from_bits(0x00000001)), 0x0000);  // smallest float subnormal rounds to zero
}

TEST(Bf16, OverflowToInfinity) {
  EXPECT_EQ(float_to_bf16(float_from_bits(0x7F7F7FFF)), 0x7F7F);  // below the tie: largest finite bf16
  EXPECT_EQ(float_to_bf16(float_from_bits(0x7F7F8000)), 0x7F80);  // tie with odd 0x7F7F -> Inf
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7F80);
  EXPECT_EQ(float_to_bf16(-std::numeric_limits<float>::max()), 0xFF80);
}

TEST(Bf16, Infinity) {
  EXPECT_EQ(float_to_bf16(kInf), 0x7F80);
  EXPECT_EQ(float_to_bf16(-kInf), 0xFF80);
  EXPECT_EQ(bf16_to_float(0x7F80), kInf);
  EXPECT_EQ(bf16_to_float(0xFF80), -kInf);
}

TEST(Bf16, NaNStaysQuietNaN) {
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::quiet_NaN()), 0x7FC0);
  // Payload only in the low 16 bits: plain rounding would give 0x7F80 (Inf).
  EXPECT_EQ(float_to_bf16(float_from_bits(0x7F800001)), 0x7FC0);
  EXPECT_EQ(float_to_bf16(float_from_bits(0xFF800001)), 0xFFC0);
  EXPECT_EQ(float_to_bf16(float_from_bits(0x7FA00000)), 0x7FE0);  // signaling, top payload bit kept, quieted
  EXPECT_EQ(float_to_bf16(float_from_bits(0x7FFFFFFF)), 0x7FFF);  // no carry out of an all-ones payload
  EXPECT_TRUE(std::isnan(bf16_to_float(0x7FC0)));
  EXPECT_EQ(float_bits(bf16_to_float(0x7F81)), 0x7FC10000u);  // signaling bf16 NaN comes back quiet
}

TEST(Bf16, EveryPatternRoundTrips) {
  for (uint32_t pattern = 0; pattern <= 0xFFFF; ++pattern) {
    const uint16_t bf16 = uint16_t(pattern);
    const float value = bf16_to_float(bf16);
    const bool is_nan = (bf16 & 0x7F80) == 0x7F80 && (bf16 & 0x007F) != 0;
    if (is_nan) {
      ASSERT_TRUE(std::isnan(value)) << std::hex << pattern;
      ASSERT_EQ(float_to_bf16(value), bf16 | 0x0040) << std::hex << pattern;
    } else {
      ASSERT_EQ(float_bits(value), pattern << 16) << std::hex << pattern;
      ASSERT_EQ(float_to_bf16(value), bf16) << std::hex << pattern;
    }
  }
}

TEST(Half, KnownValues) {
  EXPECT_EQ(float_to_half(1.0f), 0x3C00);
  EXPECT_EQ(float_to_half(-2.0f), 0xC000);
  EXPECT_EQ(float_to_half(0.0f), 0x0000);
  EXPECT_EQ(float_to_half(-0.0f), 0x8000);
  EXPECT_EQ(float_to_half(65504.0f), 0x7BFF);  // largest finite half
  EXPECT_EQ(float_to_half(-65504.0f), 0xFBFF);
  EXPECT_EQ(float_to_half(0.1f), 0x2E66);      // 1.6 * 2^-4: exponent 11, mantissa 0.6 * 1024 = 614.4 -> 614 = 0x266
  EXPECT_EQ(float_to_half(0x1p-14f), 0x0400);  // smallest normal
  EXPECT_EQ(half_to_float(0x3C00), 1.0f);
  EXPECT_EQ(half_to_float(0xC000), -2.0f);
  EXPECT_EQ(half_to_float(0x7BFF), 65504.0f);
  EXPECT_EQ(half_to_float(0x3555), 0.333251953125f);  // (1 + 0x155 / 1024) / 4 = 1365 / 4096
  EXPECT_EQ(half_to_float(0x0400), 0x1p-14f);
  EXPECT_EQ(float_bits(half_to_float(0x8000)), 0x80000000u);
}

TEST(Half, RoundToNearestEven) {
  EXPECT_EQ(float_to_half(0x1.002p0f), 0x3C00);     // 1 + 2^-11: tie, 0x3C00 even -> down
  EXPECT_EQ(float_to_half(0x1.006p0f), 0x3C02);     // 1 + 3 * 2^-11: tie, 0x3C01 odd -> up
  EXPECT_EQ(float_to_half(0x1.00201p0f), 0x3C01);   // 1 + 2^-11 + 2^-20: above the tie -> up
  EXPECT_EQ(float_to_half(0x1.001ffep0f), 0x3C00);  // 1 + 2^-11 - 2^-23: below the tie -> down
  EXPECT_EQ(float_to_half(2049.0f), 0x6800);        // spacing 2 at 2048: tie between 2048 (0x6800) and 2050
  EXPECT_EQ(float_to_half(2051.0f), 0x6802);        // tie between 2050 (0x6801, odd) and 2052 (0x6802)
  EXPECT_EQ(float_to_half(-2051.0f), 0xE802);
  EXPECT_EQ(float_to_half(0x1.ffep0f), 0x4000);  // 2 - 2^-11: tie with odd 0x3BFF -> carries to 2.0
}

TEST(Half, OverflowToInfinity) {
  EXPECT_EQ(float_to_half(65519.0f), 0x7BFF);  // below the tie at 65520
  EXPECT_EQ(float_to_half(65520.0f), 0x7C00);  // tie between 65504 (0x7BFF, odd) and 65536 -> Inf
  EXPECT_EQ(float_to_half(-65520.0f), 0xFC00);
  EXPECT_EQ(float_to_half(65536.0f), 0x7C00);
  EXPECT_EQ(float_to_half(1e6f), 0x7C00);
  EXPECT_EQ(float_to_half(std::numeric_limits<float>::max()), 0x7C00);
}

TEST(Half, Subnormals) {
  // 1e-7 / 2^-24 = 1.6777216 -> 2 ulps of 2^-24
  EXPECT_EQ(float_to_half(1e-7f), 0x0002);
  EXPECT_EQ(float_to_half(-1e-7f), 0x8002);
  EXPECT_EQ(half_to_float(0x0002), 0x1p-23f);
  EXPECT_EQ(half_to_float(0x0001), 0x1p-24f);       // smallest subnormal
  EXPECT_EQ(half_to_float(0x03FF), 0x1.ff8p-15f);   // largest subnormal: 1023 * 2^-24
  EXPECT_EQ(half_to_float(0x8201), -0x1.008p-15f);  // -(513 * 2^-24); 513 / 512 = 0x1.008
  EXPECT_EQ(float_to_half(0x1p-24f), 0x0001);
  EXPECT_EQ(float_to_half(0x1.4p-24f), 0x0001);  // 1.25 ulps -> 1
  EXPECT_EQ(float_to_half(0x1.8p-24f), 0x0002);  // 1.5 ulps: tie, 1 odd -> 2
  EXPECT_EQ(float_to_half(0x1.4p-23f), 0x0002);  // 2.5 ulps: tie, 2 even -> 2
  EXPECT_EQ(float_to_half(0x1p-25f), 0x0000);    // 0.5 ulp: tie, 0 even -> 0
  EXPECT_EQ(float_to_half(-0x1p-25f), 0x8000);
  EXPECT_EQ(float_to_half(0x1.000002p-25f), 0x0001);  // just above half an ulp -> 1
  EXPECT_EQ(float_to_half(0x1p-26f), 0x0000);
  EXPECT_EQ(float_to_half(0x1p-149f), 0x0000);     // float subnormal
  EXPECT_EQ(float_to_half(0x1.ff4p-15f), 0x03FE);  // 1022.5 ulps: tie, 1022 even
  EXPECT_EQ(float_to_half(0x1.ffcp-15f), 0x0400);  // 1023.5 ulps: tie, 1023 odd -> smallest normal
}

TEST(Half, Infinity) {
  EXPECT_EQ(float_to_half(kInf), 0x7C00);
  EXPECT_EQ(float_to_half(-kInf), 0xFC00);
  EXPECT_EQ(half_to_float(0x7C00), kInf);
  EXPECT_EQ(half_to_float(0xFC00), -kInf);
}

TEST(Half, NaNStaysQuietNaN) {
  EXPECT_EQ(float_to_half(std::numeric_limits<float>::quiet_NaN()), 0x7E00);
  // Payload only below the 10 bits half keeps: truncation alone would give 0x7C00 (Inf).
  EXPECT_EQ(float_to_half(float_from_bits(0x7F800001)), 0x7E00);
  EXPECT_EQ(float_to_half(float_from_bits(0xFF800001)), 0xFE00);
  EXPECT_EQ(float_to_half(float_from_bits(0x7FFFFFFF)), 0x7FFF);
  EXPECT_EQ(float_bits(half_to_float(0x7E00)), 0x7FC00000u);
  EXPECT_EQ(float_bits(half_to_float(0x7C01)), 0x7FC02000u);  // signaling half NaN comes back quiet
  EXPECT_TRUE(std::isnan(half_to_float(0xFFFF)));
}

TEST(Half, EveryPatternRoundTrips) {
  for (uint32_t pattern = 0; pattern <= 0xFFFF; ++pattern) {
    const uint16_t half = uint16_t(pattern);
    const float value = half_to_float(half);
    const bool is_nan = (half & 0x7C00) == 0x7C00 && (half & 0x03FF) != 0;
    if (is_nan) {
      ASSERT_TRUE(std::isnan(value)) << std::hex << pattern;
      ASSERT_EQ(float_to_half(value), half | 0x0200) << std::hex << pattern;
    } else {
      ASSERT_FALSE(std::isnan(value)) << std::hex << pattern;
      ASSERT_EQ(float_to_half(value), half) << std::hex << pattern;
    }
  }
}

TEST(Half, MonotonicOverPositiveFinites) {
  // Decoding must be strictly increasing over 0x0000..0x7BFF, which catches a subnormal/normal seam.
  for (uint32_t pattern = 1; pattern <= 0x7BFF; ++pattern) {
    ASSERT_LT(half_to_float(uint16_t(pattern - 1)), half_to_float(uint16_t(pattern))) << std::hex << pattern;
  }
}

}  // namespace
}  // namespace expertwire::reference
