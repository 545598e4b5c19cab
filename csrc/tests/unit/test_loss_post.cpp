// LossPost (device/wire_protocol.h): the fault-tolerant mode's posts of lost ranks, which readers compare by
// sequence. Pinned down here because a reader that took an older post for a newer one would end an agreement
// round early, and one that never took a post as reached would wait out a live rank.
#include <gtest/gtest.h>

#include <cstdint>

#include "device/wire_protocol.h"

namespace expertwire {
namespace {

TEST(LossPost, CarriesItsSequenceAndBits) {
  const uint32_t sequence = LossPost::sequence(5, 3);
  const uint64_t post = LossPost::encode(sequence, 0x80000001u);
  EXPECT_EQ(LossPost::lost_bits(post), 0x80000001u);
  EXPECT_TRUE(LossPost::reached(post, sequence));
}

TEST(LossPost, AFreshBufferReachesNoRound) { EXPECT_FALSE(LossPost::reached(0, LossPost::sequence(0, 1))); }

TEST(LossPost, LaterRoundsAndTheFinalPostReachEarlierRounds) {
  const uint32_t round2 = LossPost::sequence(4, 2);
  EXPECT_TRUE(LossPost::reached(LossPost::encode(LossPost::sequence(4, 3), 0), round2));
  EXPECT_FALSE(LossPost::reached(LossPost::encode(LossPost::sequence(4, 1), 0), round2));
  // A rank that agreed in round 1 answers a peer still in round 2 (or any later round) with its final post.
  const uint64_t final_post = LossPost::encode(LossPost::sequence(4, 1 | LossPost::kFinal), 0);
  EXPECT_TRUE(LossPost::reached(final_post, round2));
  EXPECT_TRUE(LossPost::reached(final_post, LossPost::sequence(4, LossPost::kMaxRound)));
  // ... but no round of the next call.
  EXPECT_FALSE(LossPost::reached(final_post, LossPost::sequence(5, 1)));
}

TEST(LossPost, ALaterCallReachesEveryRoundOfAnEarlierOne) {
  const uint64_t next_call = LossPost::encode(LossPost::sequence(9, 1), 0);
  EXPECT_TRUE(LossPost::reached(next_call, LossPost::sequence(8, LossPost::kMaxRound | LossPost::kFinal)));
}

TEST(LossPost, CallsWrapAroundTheirTwentyFourBits) {
  const uint32_t last_call = (1u << 24) - 1;
  const uint64_t wrapped = LossPost::encode(LossPost::sequence(last_call + 1, 1), 0);
  EXPECT_EQ(LossPost::sequence(last_call + 1, 1), LossPost::sequence(0, 1));
  EXPECT_TRUE(LossPost::reached(wrapped, LossPost::sequence(last_call, 1 | LossPost::kFinal)));
  EXPECT_FALSE(LossPost::reached(LossPost::encode(LossPost::sequence(last_call, 1), 0), LossPost::sequence(0, 1)));
}

}  // namespace
}  // namespace expertwire
