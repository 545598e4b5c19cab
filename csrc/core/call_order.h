// The order of one rank's calls on an all-to-all: a dispatch (its send half, then its receive half), then that
// dispatch's combine (send half, then receive half), then the next dispatch. Out of this order a call would
// find state the kernels leave for the call that should have come (a dispatch's receive counters, the rows of a
// combine never sent) and return wrong tokens without any error, so the host refuses it first.
#pragma once

#include "expertwire/dtype.h"

namespace expertwire {

enum class Operation { kDispatch, kCombine };

class CallOrder {
 public:
  // Throws ConfigError (naming what must come first) if `op`'s `split` may not be the next call.
  void check(Operation op, SplitMode split) const;
  // Records a call that has been launched.
  void advance(Operation op, SplitMode split);

 private:
  enum class Stage { kIdle, kDispatchSent, kDispatched, kCombineSent };
  const char* what_comes_next() const;
  Stage stage_ = Stage::kIdle;
};

}  // namespace expertwire
