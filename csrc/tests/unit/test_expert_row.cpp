// How the kernels read each entry of the caller's indices (device/expert_row.cuh), on the host.
#include "device/expert_row.cuh"

#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <vector>

namespace expertwire::device {
namespace {

TEST(ExpertRow, Int64EntriesOutsideThe32BitExpertsReadAsOutOfRange) {
  const std::vector<int64_t> entries = {0,
                                        5,
                                        -1,
                                        -2,
                                        int64_t(kUnrepresentableExpert) - 1,
                                        int64_t(kUnrepresentableExpert),
                                        (int64_t(1) << 32) - 1,
                                        (int64_t(1) << 32) + 5,
                                        std::numeric_limits<int64_t>::min(),
                                        std::numeric_limits<int64_t>::max()};
  const ExpertIndices indices{entries.data(), IndexType::kInt64};
  const ExpertRow row(indices, 0, uint32_t(entries.size()));
  const std::vector<uint32_t> read = {0,
                                      5,
                                      kNoExpert,
                                      kUnrepresentableExpert,
                                      kUnrepresentableExpert - 1,
                                      kUnrepresentableExpert,
                                      kUnrepresentableExpert,
                                      kUnrepresentableExpert,
                                      kUnrepresentableExpert,
                                      kUnrepresentableExpert};
  for (uint32_t k = 0; k < entries.size(); ++k) {
    EXPECT_EQ(row[k], read[k]) << "entry " << entries[k];
    EXPECT_EQ(row.written(k), entries[k]);
  }
}

TEST(ExpertRow, RowsOfEitherTypeStartAtTheirToken) {
  const std::vector<uint32_t> words = {1, 2, 3, kNoExpert, 5, 6};
  const std::vector<int64_t> wide = {1, 2, 3, -1, 5, 6};
  for (const ExpertIndices indices :
       {ExpertIndices{words.data(), IndexType::kUInt32}, ExpertIndices{wide.data(), IndexType::kInt64}}) {
    const ExpertRow second(indices, 1, 3);
    EXPECT_EQ(second[0], kNoExpert);
    EXPECT_EQ(second[2], 6u);
    EXPECT_EQ(second.written(1), 5);
  }
  EXPECT_EQ(ExpertRow({words.data(), IndexType::kUInt32}, 1, 3).written(0), int64_t(kNoExpert));
}

}  // namespace
}  // namespace expertwire::device
