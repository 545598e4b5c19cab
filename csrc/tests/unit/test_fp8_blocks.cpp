// The reference fp8 block cast on values worked out by hand (e4m3: bias 7, 3 mantissa bits, max 448).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "core/error.h"
#include "reference/fp8_blocks.h"
#include "reference/reference.h"
#include "tests/unit/config_error.h"

namespace expertwire::reference {
namespace {

using ::testing::HasSubstr;

TEST(Fp8E4m3, RoundsToNearestEvenAndSaturates) {
  EXPECT_EQ(float_to_e4m3_satfinite(1.0f), 0x38);  // exponent 7 << 3
  EXPECT_EQ(float_to_e4m3_satfinite(-1.0f), 0xb8);
  EXPECT_EQ(float_to_e4m3_satfinite(1.0625f), 0x38);  // halfway 1.0 / 1.125: to the even mantissa 0
  EXPECT_EQ(float_to_e4m3_satfinite(1.1875f), 0x3a);  // halfway 1.125 / 1.25: to the even mantissa 2
  EXPECT_EQ(float_to_e4m3_satfinite(1.9375f), 0x40);  // halfway 1.875 / 2.0: up into the next exponent
  EXPECT_EQ(float_to_e4m3_satfinite(448.0f), 0x7e);
  EXPECT_EQ(float_to_e4m3_satfinite(464.0f), 0x7e);  // halfway 448 / 480, and 480 is no finite code
  EXPECT_EQ(float_to_e4m3_satfinite(1e6f), 0x7e);
  EXPECT_EQ(float_to_e4m3_satfinite(-std::numeric_limits<float>::infinity()), 0xfe);
  EXPECT_EQ(float_to_e4m3_satfinite(std::nanf("")), 0x7f);
  EXPECT_EQ(float_to_e4m3_satfinite(std::ldexp(1.0f, -6)), 0x08);   // smallest normal
  EXPECT_EQ(float_to_e4m3_satfinite(std::ldexp(7.0f, -9)), 0x07);   // largest subnormal
  EXPECT_EQ(float_to_e4m3_satfinite(std::ldexp(1.0f, -9)), 0x01);   // smallest subnormal
  EXPECT_EQ(float_to_e4m3_satfinite(std::ldexp(1.0f, -10)), 0x00);  // halfway 0 / 2^-9: to 0
  EXPECT_EQ(float_to_e4m3_satfinite(std::ldexp(3.0f, -10)), 0x02);  // halfway 2^-9 / 2^-8: to 2^-8
  EXPECT_EQ(float_to_e4m3_satfinite(0.0f), 0x00);
  EXPECT_EQ(float_to_e4m3_satfinite(-0.0f), 0x80);
}

TEST(Fp8E4m3, EveryFiniteCodeRoundTrips) {
  for (int code = 0; code < 256; ++code) {
    if ((code & 0x7f) == 0x7f) continue;  // NaN
    EXPECT_EQ(float_to_e4m3_satfinite(e4m3_to_float(uint8_t(code))), code) << code;
  }
  EXPECT_EQ(e4m3_to_float(0x7e), 448.0f);
  EXPECT_EQ(e4m3_to_float(0x01), std::ldexp(1.0f, -9));
  EXPECT_TRUE(std::isnan(e4m3_to_float(0xff)));
}

// One token of two blocks: block 0 holds 2.0 at 5 and 1.0 at 6, block 1 is all zero (amax floor 1e-4).
struct TwoBlocks {
  std::vector<uint16_t> x = std::vector<uint16_t>(256, float_to_bf16(0.0f));
  std::vector<uint8_t> out = std::vector<uint8_t>(256, 0xaa);
  std::vector<float> scale_inv = std::vector<float>(2, -1.0f);
  TwoBlocks() {
    x[5] = float_to_bf16(2.0f);
    x[6] = float_to_bf16(1.0f);
  }
};

TEST(Fp8Blocks, PlainScalesMapEachBlocksAmaxTo448) {
  TwoBlocks t;
  cast_fp8_blocks(t.x.data(), 1, 256, /*round_scale=*/false, t.out.data(), t.scale_inv.data());
  EXPECT_EQ(t.scale_inv[0], 2.0f * (1.0f / 448.0f));
  EXPECT_EQ(t.scale_inv[1], 1e-4f * (1.0f / 448.0f));
  EXPECT_EQ(t.out[5], 0x7e);  // 2 * 224 = 448
  EXPECT_EQ(t.out[6], 0x76);  // 224 = 1.75 * 2^7: exponent 14, mantissa 6
  for (int i = 0; i < 256; ++i) {
    if (i != 5 && i != 6) EXPECT_EQ(t.out[i], 0x00) << i;
  }
}

TEST(Fp8Blocks, RoundedScalesArePowersOfTwo) {
  TwoBlocks t;
  cast_fp8_blocks(t.x.data(), 1, 256, /*round_scale=*/true, t.out.data(), t.scale_inv.data());
  // 2 / 448 = 2^-7.8: scale_inv 2^-7, scale 128.
  EXPECT_EQ(t.scale_inv[0], std::ldexp(1.0f, -7));
  EXPECT_EQ(t.out[5], 0x78);  // 256 = 2^8: exponent 15, mantissa 0
  EXPECT_EQ(t.out[6], 0x70);  // 128 = 2^7
  // 1e-4 / 448 = 2^-22.09: scale_inv 2^-22.
  EXPECT_EQ(t.scale_inv[1], std::ldexp(1.0f, -22));
  EXPECT_EQ(ue8m0_of(t.scale_inv[0]), 120);
  EXPECT_EQ(ue8m0_of(t.scale_inv[1]), 105);
}

TEST(Fp8Blocks, RefusesAHiddenDimOutsideWholeBlocks) {
  std::vector<uint16_t> x(100);
  std::vector<uint8_t> out(100);
  std::vector<float> scales(1);
  EXPECT_THAT(config_error_message([&] { cast_fp8_blocks(x.data(), 1, 100, false, out.data(), scales.data()); }),
              HasSubstr("hidden_dim must be a multiple of 128, got 100"));
  EXPECT_THAT(config_error_message([] { ue8m0_of(0.75f); }), HasSubstr("positive normal power of two, got 0.75"));
}

}  // namespace
}  // namespace expertwire::reference
