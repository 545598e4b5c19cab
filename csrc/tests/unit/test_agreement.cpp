// transport/common/agreement.h: ranks, played by threads over an in-process all-gather, either all construct or all
// throw, each with the message its own situation calls for.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <condition_variable>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "core/layout.h"
#include "transport/common/agreement.h"

namespace expertwire {
namespace {

using ::testing::HasSubstr;

// An all-gather among `ranks` threads: each call blocks until every rank has contributed, then returns all.
class ThreadAllGather {
 public:
  explicit ThreadAllGather(int ranks) : entries_(static_cast<size_t>(ranks)) {}
  AllGatherBytes for_rank(int rank) {
    return [this, rank](const std::string& local) {
      std::unique_lock<std::mutex> lock(mutex_);
      entries_[size_t(rank)] = local;
      if (++arrived_ == int(entries_.size())) {
        done_.notify_all();
      } else {
        done_.wait(lock, [&] { return arrived_ == int(entries_.size()); });
      }
      return entries_;
    };
  }

 private:
  std::mutex mutex_;
  std::condition_variable done_;
  std::vector<std::string> entries_;
  int arrived_ = 0;
};

LayoutSignature signature_of(int64_t scale_bytes) {
  return layout_signature(make_buffer_layout(make_config(8, 8, 2, 0, 4, 1, 256, 256, scale_bytes), 4));
}

// Runs the agreement on `ranks` threads, rank r's own checks being own_checks(r); returns each rank's outcome:
// "ok" or the message it threw.
std::vector<std::string> agree(int ranks, const std::function<LayoutSignature(int)>& own_checks) {
  ThreadAllGather gather(ranks);
  std::vector<std::string> outcome(static_cast<size_t>(ranks));
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r) {
    threads.emplace_back([&, r] {
      try {
        agree_before_allocating("test", r, ranks, gather.for_rank(r), [&] { return own_checks(r); });
        outcome[size_t(r)] = "ok";
      } catch (const std::exception& error) {
        outcome[size_t(r)] = error.what();
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  return outcome;
}

TEST(RankAgreement, EveryRankGoesOnWhenAllAgree) {
  for (const std::string& outcome : agree(3, [](int) { return signature_of(8); })) EXPECT_EQ(outcome, "ok");
}

TEST(RankAgreement, OneRanksFailedCheckStopsEveryRank) {
  const std::vector<std::string> outcome = agree(3, [](int r) {
    if (r == 1) EW_THROW(ConfigError, "AllToAllConfig.max_num_tokens must be > 0, got 0");
    return signature_of(8);
  });
  EXPECT_EQ(outcome[1], "AllToAllConfig.max_num_tokens must be > 0, got 0");
  for (const int r : {0, 2}) {
    EXPECT_EQ(outcome[size_t(r)],
              "test: rank 1 could not construct its all-to-all (its own error says why), so no rank does");
  }
}

TEST(RankAgreement, ARuntimeFailureCountsAsTheRanksOwn) {
  const std::vector<std::string> outcome = agree(2, [](int r) {
    if (r == 0) EW_THROW(RuntimeError, "cudaMalloc failed: out of memory");
    return signature_of(8);
  });
  EXPECT_EQ(outcome[0], "cudaMalloc failed: out of memory");
  EXPECT_THAT(outcome[1], HasSubstr("rank 0 could not construct its all-to-all"));
}

TEST(RankAgreement, LayoutsThatDifferStopEveryRankNamingTheField) {
  const std::vector<std::string> outcome = agree(3, [](int r) { return signature_of(r == 2 ? 16 : 8); });
  for (const std::string& message : outcome) {
    EXPECT_EQ(message,
              "ranks disagree on hidden_dim_scale_bytes: rank 0 has 8, rank 2 has 16; every rank must construct its "
              "all-to-all alike");
  }
}

TEST(RankAgreement, AnAllGatherThatDoesNotReturnEveryRankInOrderIsNamed) {
  const AllGatherBytes one_entry = [](const std::string& local) { return std::vector<std::string>{local}; };
  const AllGatherBytes repeated = [](const std::string& local) { return std::vector<std::string>(2, local); };
  const AllGatherBytes garbage = [](const std::string&) { return std::vector<std::string>(2, "garbage"); };
  auto message = [](const AllGatherBytes& gather, int rank) -> std::string {
    try {
      agree_before_allocating("test", rank, 2, gather, [] { return signature_of(8); });
    } catch (const ConfigError& error) {
      return error.what();
    }
    return "ok";
  };
  EXPECT_EQ(message(one_entry, 0), "test: all_gather returned 1 entries, expected world_size=2");
  EXPECT_THAT(message(repeated, 0), HasSubstr("test: entry 1 of all_gather is not rank 1's agreement record"));
  EXPECT_THAT(message(garbage, 1), HasSubstr("test: entry 0 of all_gather holds 7 bytes of agreement record"));
}

}  // namespace
}  // namespace expertwire
