// core/arguments.h: every configuration-only check of dispatch's and combine's arguments, and its message.
// test_failures makes the same calls on the device; these pin every rule down without one.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <string>

#include "core/arguments.h"
#include "core/error.h"
#include "tests/unit/config_error.h"

namespace expertwire {
namespace {

using ::testing::HasSubstr;

// 8 experts on 4 ranks (2 local), 8 tokens a group, 2 scale words a token: recv = 32 rows per local expert.
AllToAllConfig config() { return make_config(8, 8, 2, 0, 4, 1, 256, 256, 8); }

alignas(16) uint8_t memory[4096];

// Valid arguments of a whole dispatch of 5 tokens, contiguous.
DispatchParams valid_dispatch() {
  DispatchParams p;
  p.out_expert_num_tokens = reinterpret_cast<int32_t*>(memory);
  p.out_expert_x = memory;
  p.out_expert_x_scale = contiguous_matrices(reinterpret_cast<float*>(memory), 32, 8);
  p.dp_x = contiguous_rows<const uint8_t>(memory, 256);
  p.dp_x_scale = contiguous_rows(reinterpret_cast<const float*>(memory), 8);
  p.indices = memory;
  p.m = 5;
  return p;
}

CombineParams valid_combine() {
  CombineParams p;
  p.out_tokens = memory;
  p.indices = memory;
  p.weights = reinterpret_cast<const float*>(memory);
  p.expert_y = memory;
  p.m = 5;
  return p;
}

void check_dispatch(const DispatchParams& p) {
  check_dispatch_layout(config(), p);
  check_dispatch_pointers(config(), p);
}

void check_combine(const CombineParams& p) {
  check_combine_layout(config(), p);
  check_combine_pointers(config(), p);
}

// The message the checks throw for valid arguments spoiled by `spoil`.
std::string dispatch_error(const std::function<void(DispatchParams&)>& spoil) {
  DispatchParams p = valid_dispatch();
  spoil(p);
  return config_error_message([&] { check_dispatch(p); });
}

std::string combine_error(const std::function<void(CombineParams&)>& spoil) {
  CombineParams p = valid_combine();
  spoil(p);
  return config_error_message([&] { check_combine(p); });
}

// Valid arguments changed by `change` still pass.
void expect_dispatch_passes(const std::function<void(DispatchParams&)>& change) {
  DispatchParams p = valid_dispatch();
  change(p);
  EXPECT_NO_THROW(check_dispatch(p));
}

void expect_combine_passes(const std::function<void(CombineParams&)>& change) {
  CombineParams p = valid_combine();
  change(p);
  EXPECT_NO_THROW(check_combine(p));
}

TEST(DispatchArguments, ValidOnesPass) {
  expect_dispatch_passes([](DispatchParams&) {});
  // Padded rows, column-major scales, a broadcast scale row: every layout the kernels follow.
  expect_dispatch_passes([](DispatchParams& p) { p.dp_x.row_stride = 272; });
  expect_dispatch_passes([](DispatchParams& p) { p.out_expert_x_scale = {p.out_expert_x_scale.data, 256, 4, 128}; });
  expect_dispatch_passes([](DispatchParams& p) { p.dp_x_scale.row_stride = 0; });
}

TEST(DispatchArguments, CountsAndStrides) {
  EXPECT_EQ(dispatch_error([](DispatchParams& p) { p.m = 9; }), "dispatch: m must be <= max_num_tokens=8, got 9");
  EXPECT_THAT(dispatch_error([](DispatchParams& p) { p.dp_x.row_stride = 264; }),
              HasSubstr("dispatch: dp_x's rows must lie a multiple of 16 bytes apart, at least hidden_dim_bytes=256, "
                        "got a row stride of 264 bytes"));
  EXPECT_THAT(dispatch_error([](DispatchParams& p) { p.dp_x.row_stride = 240; }),
              HasSubstr("got a row stride of 240 bytes"));
  EXPECT_THAT(dispatch_error([](DispatchParams& p) { p.dp_x.element_stride = 2; }),
              HasSubstr("dispatch: dp_x's bytes must be contiguous within a row (element stride 1 byte), got an "
                        "element stride of 2 bytes"));
  EXPECT_EQ(dispatch_error([](DispatchParams& p) { p.dp_x_scale.element_stride = 2; }),
            "dispatch: dp_x_scale: word stride must be a multiple of 4 bytes, got 2");
  EXPECT_EQ(dispatch_error([](DispatchParams& p) { p.out_expert_x_scale.row_stride = 6; }),
            "dispatch: out_expert_x_scale: row stride must be a multiple of 4 bytes, got 6");
}

TEST(DispatchArguments, StridesOfDimensionsNotSteppedAreFree) {
  // One token: dp_x's and dp_x_scale's row strides are never used.
  expect_dispatch_passes([](DispatchParams& p) {
    p.m = 1;
    p.dp_x.row_stride = 3;
    p.dp_x_scale.row_stride = 2;
  });
}

TEST(DispatchArguments, OutputScalesMayNotOverlapThemselves) {
  // Every row at one address (row stride 0), and rows one word apart but two words wide.
  EXPECT_EQ(dispatch_error([](DispatchParams& p) { p.out_expert_x_scale.row_stride = 0; }),
            "dispatch: out_expert_x_scale must not overlap itself (two words at one address), got byte strides "
            "(256, 0, 4) over shape [2, 32, 2]");
  EXPECT_THAT(dispatch_error([](DispatchParams& p) { p.out_expert_x_scale.row_stride = 4; }),
              HasSubstr("must not overlap itself"));
  EXPECT_THAT(dispatch_error([](DispatchParams& p) { p.out_expert_x_scale.matrix_stride = 200; }),
              HasSubstr("must not overlap itself"));
}

TEST(DispatchArguments, PointersOfTheHalvesThatUseThem) {
  EXPECT_EQ(dispatch_error([](DispatchParams& p) { p.dp_x.data = nullptr; }), "dispatch: dp_x must not be null");
  EXPECT_THAT(dispatch_error([](DispatchParams& p) { p.dp_x.data += 8; }),
              HasSubstr("dispatch: dp_x must be 16-byte aligned"));
  EXPECT_EQ(dispatch_error([](DispatchParams& p) { p.indices = nullptr; }), "dispatch: indices must not be null");
  EXPECT_EQ(dispatch_error([](DispatchParams& p) { p.dp_x_scale.data = nullptr; }),
            "dispatch: dp_x_scale must not be null");
  EXPECT_EQ(dispatch_error([](DispatchParams& p) { p.out_expert_num_tokens = nullptr; }),
            "dispatch: out_expert_num_tokens must not be null");
  EXPECT_THAT(dispatch_error([](DispatchParams& p) { p.out_expert_x += 4; }),
              HasSubstr("dispatch: out_expert_x must be 16-byte aligned"));
  EXPECT_THAT(dispatch_error([](DispatchParams& p) { p.bound_m = reinterpret_cast<const uint32_t*>(memory + 2); }),
              HasSubstr("dispatch: bound_m must be 4-byte aligned"));
  // The receive half reads no input, the send half writes no output; without tokens the inputs may be null.
  expect_dispatch_passes([](DispatchParams& p) {
    p.split = SplitMode::kRecv;
    p.dp_x.data = nullptr;
    p.indices = nullptr;
  });
  expect_dispatch_passes([](DispatchParams& p) {
    p.split = SplitMode::kSend;
    p.out_expert_x = nullptr;
  });
  expect_dispatch_passes([](DispatchParams& p) {
    p.m = 0;
    p.dp_x.data = nullptr;
    p.dp_x_scale.data = nullptr;
  });
}

TEST(Arguments, IndicesOfEitherTypeAlignedToTheirEntries) {
  const auto* int64_misaligned = reinterpret_cast<const int64_t*>(memory + 4);
  EXPECT_THAT(dispatch_error([&](DispatchParams& p) {
                p.indices = int64_misaligned;
                p.index_type = IndexType::kInt64;
              }),
              HasSubstr("dispatch: indices must be 8-byte aligned"));
  EXPECT_THAT(combine_error([&](CombineParams& p) {
                p.indices = int64_misaligned;
                p.index_type = IndexType::kInt64;
              }),
              HasSubstr("combine: indices must be 8-byte aligned"));
  expect_dispatch_passes([&](DispatchParams& p) { p.indices = memory + 4; });  // uint32 words: 4 bytes suffice
  expect_dispatch_passes([&](DispatchParams& p) {
    p.indices = memory + 8;
    p.index_type = IndexType::kInt64;
  });
  EXPECT_EQ(dispatch_error([](DispatchParams& p) { p.index_type = IndexType(2); }),
            "dispatch: index_type must be one of IndexType's values, got 2");
  EXPECT_EQ(combine_error([](CombineParams& p) { p.index_type = IndexType(7); }),
            "combine: index_type must be one of IndexType's values, got 7");
}

TEST(CombineArguments, TypesCountsAndPointers) {
  expect_combine_passes([](CombineParams&) {});
  EXPECT_EQ(combine_error([](CombineParams& p) { p.m = 9; }), "combine: m must be <= max_num_tokens=8, got 9");
  EXPECT_EQ(combine_error([](CombineParams& p) {
              p.expert_type = ScalarType::kFloat32;
              p.out_type = ScalarType::kFloat32;
            }),
            "combine: a float32 expert_y needs bfloat16 or float16 out_tokens (its rows travel as that type), got "
            "float32 out_tokens");
  expect_combine_passes([](CombineParams& p) { p.expert_type = ScalarType::kFloat32; });
  EXPECT_EQ(combine_error([](CombineParams& p) { p.expert_y = nullptr; }), "combine: expert_y must not be null");
  EXPECT_THAT(combine_error([](CombineParams& p) { p.out_tokens = memory + 8; }),
              HasSubstr("combine: out_tokens must be 16-byte aligned"));
  EXPECT_EQ(combine_error([](CombineParams& p) { p.weights = nullptr; }), "combine: weights must not be null");
  expect_combine_passes([](CombineParams& p) {
    p.split = SplitMode::kRecv;
    p.expert_y = nullptr;
  });
}

// With an fp8 cast, dp_x holds bf16 rows (2 * hidden_dim bytes) and the cast makes the scales.
DispatchParams valid_cast_dispatch() {
  DispatchParams p = valid_dispatch();
  p.cast = Fp8Cast::kBlockScales;
  p.dp_x = contiguous_rows<const uint8_t>(memory, 512);
  p.dp_x_scale = {};
  return p;
}

TEST(DispatchArguments, Fp8CastTakesBf16RowsAndMakesTheScales) {
  for (const Fp8Cast cast : {Fp8Cast::kBlockScales, Fp8Cast::kPowerOfTwoScales}) {
    DispatchParams p = valid_cast_dispatch();
    p.cast = cast;
    EXPECT_NO_THROW(check_dispatch(p));
  }
  auto error = [](const std::function<void(DispatchParams&)>& spoil) {
    DispatchParams p = valid_cast_dispatch();
    spoil(p);
    return config_error_message([&] { check_dispatch(p); });
  };
  EXPECT_THAT(
      error([](DispatchParams& p) { p.dp_x_scale = contiguous_rows(reinterpret_cast<const float*>(memory), 8); }),
      HasSubstr("dp_x_scale must be null with an fp8 cast"));
  EXPECT_THAT(error([](DispatchParams& p) { p.dp_x = contiguous_rows<const uint8_t>(memory, 256); }),
              HasSubstr("at least 2 * hidden_dim=512, got a row stride of 256 bytes"));
  EXPECT_THAT(error([](DispatchParams& p) { p.cast = Fp8Cast::kUe8m0Scales; }),
              HasSubstr("an fp8 cast with UE8M0 scales needs hidden_dim a multiple of 512, got 256"));
  EXPECT_THAT(error([](DispatchParams& p) { p.cast = Fp8Cast(7); }),
              HasSubstr("cast must be one of Fp8Cast's values, got 7"));
  // The configuration must be one of fp8 rows with block scales.
  const AllToAllConfig bf16_rows = make_config(8, 8, 2, 0, 4, 1, 256, 512, 8);
  const DispatchParams p = valid_cast_dispatch();
  EXPECT_THAT(config_error_message([&] { check_dispatch_layout(bf16_rows, p); }),
              HasSubstr("needs hidden_dim_bytes = hidden_dim=256 (one e4m3 byte a value), got 512"));
}

}  // namespace
}  // namespace expertwire
