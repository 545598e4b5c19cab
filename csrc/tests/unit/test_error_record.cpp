// describe(): the sentence DeviceError carries for each error a kernel can record. test_failures asserts
// fragments of these sentences on the device; here every code is pinned down without one.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "device/error_record.h"

namespace expertwire {
namespace {

using ::testing::HasSubstr;

ErrorRecord record(ErrorCode code, Phase phase, int32_t peer, int64_t value) {
  ErrorRecord r{};
  r.code = code;
  r.phase = phase;
  r.peer = peer;
  r.value = value;
  return r;
}

TEST(DescribeErrorRecord, TimeoutNamesTheMissingRankAndThePhase) {
  EXPECT_EQ(describe(record(ErrorCode::kTimeout, Phase::kDispatchRecv, 3, 1500), 0),
            "timed out after 1500 ms waiting for rank 3 in dispatch receive on rank 0");
  EXPECT_EQ(describe(record(ErrorCode::kTimeout, Phase::kCombineRecv, 1, 10000), 2),
            "timed out after 10000 ms waiting for rank 1 in combine receive on rank 2");
}

TEST(DescribeErrorRecord, BadInputNamesTheValue) {
  EXPECT_EQ(describe(record(ErrorCode::kBadExpertIndex, Phase::kDispatchSend, -1, 11), 1),
            "expert index 11 out of range in dispatch send on rank 1");
  EXPECT_EQ(describe(record(ErrorCode::kBadBoundM, Phase::kCombineRecv, -1, 33), 1),
            "bound_m = 33 exceeds m in combine receive on rank 1");
  EXPECT_THAT(describe(record(ErrorCode::kSlotOverflow, Phase::kDispatchSend, -1, 5), 0),
              HasSubstr("more than max_num_tokens tokens for expert 5"));
  EXPECT_EQ(describe(record(ErrorCode::kRepeatedExpert, Phase::kDispatchSend, -1, 7), 0),
            "expert 7 appears twice in one token's row in dispatch send on rank 0");
}

TEST(DescribeErrorRecord, RowTypeMismatchNamesBothTypesAndThePeer) {
  const int64_t value = RowTypeMismatch::value(ScalarType::kFloat16, ScalarType::kBFloat16);
  EXPECT_EQ(RowTypeMismatch::peer(value), ScalarType::kFloat16);
  EXPECT_EQ(RowTypeMismatch::own(value), ScalarType::kBFloat16);
  EXPECT_EQ(describe(record(ErrorCode::kRowTypeMismatch, Phase::kCombineRecv, 3, value), 1),
            "rank 3's expert rows travel as float16, this rank's as bfloat16 (a rank's rows travel as its expert_y's "
            "type, or as its out_tokens' with a float32 expert_y, and must travel alike on every rank); no output "
            "written in combine receive on rank 1");
}

TEST(DescribeErrorRecord, MaskedOutNamesTheRankThatSaidSo) {
  EXPECT_EQ(describe(record(ErrorCode::kMaskedOut, Phase::kDispatchRecv, 2, 0), 7),
            "rank 2 reports that the ranks gave up on this one (it was too late for them or stopped calling) and "
            "masked it out; the survivors go on without it, so this object cannot rejoin them in dispatch receive "
            "on rank 7");
}

TEST(DescribeErrorRecord, EveryPhaseHasAName) {
  EXPECT_STREQ(phase_name(Phase::kDispatchSend), "dispatch send");
  EXPECT_STREQ(phase_name(Phase::kDispatchRecv), "dispatch receive");
  EXPECT_STREQ(phase_name(Phase::kCombineSend), "combine send");
  EXPECT_STREQ(phase_name(Phase::kCombineRecv), "combine receive");
  EXPECT_STREQ(phase_name(Phase::kNone), "unknown phase");
}

}  // namespace
}  // namespace expertwire
