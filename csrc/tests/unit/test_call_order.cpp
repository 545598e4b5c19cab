// CallOrder: which dispatch and combine halves may come next on one rank, and what the refusal says.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>

#include "core/call_order.h"
#include "core/error.h"

namespace expertwire {
namespace {

using ::testing::HasSubstr;

// Checks, then records, as AllToAll does around each launch.
void call(CallOrder& order, Operation op, SplitMode split) {
  order.check(op, split);
  order.advance(op, split);
}

std::string refusal(const CallOrder& order, Operation op, SplitMode split) {
  try {
    order.check(op, split);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(accepted)";
}

TEST(CallOrder, WholeAndSplitCallsAlternate) {
  CallOrder order;
  for (int round = 0; round < 3; ++round) {
    call(order, Operation::kDispatch, SplitMode::kNone);
    call(order, Operation::kCombine, SplitMode::kNone);
    call(order, Operation::kDispatch, SplitMode::kSend);
    call(order, Operation::kDispatch, SplitMode::kRecv);
    call(order, Operation::kCombine, SplitMode::kSend);
    call(order, Operation::kCombine, SplitMode::kRecv);
    call(order, Operation::kDispatch, SplitMode::kNone);  // whole and split halves mix
    call(order, Operation::kCombine, SplitMode::kSend);
    call(order, Operation::kCombine, SplitMode::kRecv);
  }
}

TEST(CallOrder, ADispatchWithoutItsCombineIsRefused) {
  CallOrder order;
  call(order, Operation::kDispatch, SplitMode::kNone);
  const std::string message = refusal(order, Operation::kDispatch, SplitMode::kNone);
  EXPECT_THAT(message, HasSubstr("dispatch out of order: the combine of the last dispatch comes next"));
  EXPECT_THAT(message, HasSubstr("every dispatch is followed by its combine, on every rank"));
  EXPECT_THAT(refusal(order, Operation::kDispatch, SplitMode::kSend), HasSubstr("dispatch (send half) out of order"));
  EXPECT_THAT(refusal(order, Operation::kDispatch, SplitMode::kRecv),
              HasSubstr("dispatch (receive half) out of order: the combine of the last dispatch comes next"));
}

TEST(CallOrder, ACombineWithoutADispatchIsRefused) {
  CallOrder order;
  for (SplitMode split : {SplitMode::kNone, SplitMode::kSend, SplitMode::kRecv}) {
    EXPECT_THAT(refusal(order, Operation::kCombine, split), HasSubstr("out of order: a dispatch (do_send) comes next"));
  }
}

TEST(CallOrder, AReceiveHalfNeedsItsSendHalf) {
  CallOrder order;
  EXPECT_THAT(refusal(order, Operation::kDispatch, SplitMode::kRecv),
              HasSubstr("dispatch (receive half) out of order: a dispatch (do_send) comes next"));
  call(order, Operation::kDispatch, SplitMode::kSend);
  for (SplitMode split : {SplitMode::kNone, SplitMode::kSend}) {
    EXPECT_THAT(refusal(order, Operation::kDispatch, split),
                HasSubstr("out of order: the dispatch's receive half (do_recv only) comes next"));
  }
  EXPECT_THAT(refusal(order, Operation::kCombine, SplitMode::kNone),
              HasSubstr("combine out of order: the dispatch's receive half (do_recv only) comes next"));
  call(order, Operation::kDispatch, SplitMode::kRecv);
  call(order, Operation::kCombine, SplitMode::kSend);
  EXPECT_THAT(refusal(order, Operation::kCombine, SplitMode::kSend),
              HasSubstr("combine (send half) out of order: the combine's receive half (do_recv only) comes next"));
  EXPECT_THAT(refusal(order, Operation::kDispatch, SplitMode::kNone),
              HasSubstr("the combine's receive half (do_recv only) comes next"));
}

TEST(CallOrder, ARefusedCallLeavesTheOrderAsItWas) {
  CallOrder order;
  EXPECT_THAT(refusal(order, Operation::kCombine, SplitMode::kNone), HasSubstr("out of order"));
  call(order, Operation::kDispatch, SplitMode::kNone);  // still the first call
  call(order, Operation::kCombine, SplitMode::kNone);
}

}  // namespace
}  // namespace expertwire
