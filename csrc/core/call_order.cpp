#include "core/call_order.h"

#include "core/error.h"

namespace expertwire {

const char* CallOrder::what_comes_next() const {
  switch (stage_) {
    case Stage::kIdle: return "a dispatch (do_send) comes next";
    case Stage::kDispatchSent: return "the dispatch's receive half (do_recv only) comes next";
    case Stage::kDispatched: return "the combine of the last dispatch comes next";
    case Stage::kCombineSent: return "the combine's receive half (do_recv only) comes next";
  }
  return "";
}

void CallOrder::check(Operation op, SplitMode split) const {
  const bool dispatch = op == Operation::kDispatch;
  const Stage expected = dispatch ? (split == SplitMode::kRecv ? Stage::kDispatchSent : Stage::kIdle)
                                  : (split == SplitMode::kRecv ? Stage::kCombineSent : Stage::kDispatched);
  const char* half = split == SplitMode::kNone ? "" : split == SplitMode::kSend ? " (send half)" : " (receive half)";
  EW_REQUIRE(stage_ == expected, dispatch ? "dispatch" : "combine", half, " out of order: ", what_comes_next(),
             " (every dispatch is followed by its combine, on every rank)");
}

void CallOrder::advance(Operation op, SplitMode split) {
  if (op == Operation::kDispatch) {
    stage_ = split == SplitMode::kSend ? Stage::kDispatchSent : Stage::kDispatched;
  } else {
    stage_ = split == SplitMode::kSend ? Stage::kCombineSent : Stage::kIdle;
  }
}

}  // namespace expertwire
