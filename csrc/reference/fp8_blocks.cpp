#include "reference/fp8_blocks.h"

#include <cmath>

#include "core/error.h"
#include "reference/reference.h"

namespace expertwire::reference {
namespace {

// ceil(log2(x)) of a positive normal float, from its exponent and whether any mantissa bit is set.
int log2_ceil(float x) {
  const uint32_t bits = float_bits(x);
  return int((bits >> 23) & 0xff) - 127 + ((bits & 0x7fffff) != 0 ? 1 : 0);
}

float pow2(int exponent) { return float_from_bits(uint32_t(exponent + 127) << 23); }

}  // namespace

uint8_t float_to_e4m3_satfinite(float value) {
  const uint8_t sign = std::signbit(value) ? 0x80 : 0x00;
  if (std::isnan(value)) return sign | 0x7f;
  const float magnitude = std::fabs(value);
  // 464 is halfway to 480, which e4m3 lacks: from there (inf included) the value saturates; below it, the
  // rounding below stays within 448.
  constexpr uint8_t kMaxFinite = 0x7e;  // exponent 15, mantissa 6: 1.75 * 2^8 = 448
  if (magnitude >= 464.0f) return sign | kMaxFinite;
  if (magnitude == 0.0f) return sign;
  int exponent = 0;
  std::frexp(magnitude, &exponent);  // magnitude = f * 2^exponent, f in [0.5, 1)
  exponent -= 1;                     // magnitude = 1.x * 2^exponent
  if (exponent < -6) {
    // Subnormal: multiples of 2^-9; a count of 8 is the smallest normal, whose code is the same 8.
    return sign | uint8_t(std::nearbyint(std::ldexp(magnitude, 9)));
  }
  // Exact in float: a power-of-two scale and a shift of the mantissa.
  const float eighths = (std::ldexp(magnitude, -exponent) - 1.0f) * 8.0f;
  int mantissa = int(std::nearbyint(eighths));  // the current rounding mode: to nearest even
  if (mantissa == 8) {
    mantissa = 0;
    ++exponent;
  }
  return sign | uint8_t(((exponent + 7) << 3) | mantissa);
}

float e4m3_to_float(uint8_t code) {
  const float sign = (code & 0x80) != 0 ? -1.0f : 1.0f;
  const int exponent = (code >> 3) & 0xf, mantissa = code & 0x7;
  if (exponent == 0xf && mantissa == 0x7) return std::nanf("");
  if (exponent == 0) return sign * std::ldexp(float(mantissa), -9);
  return sign * std::ldexp(1.0f + float(mantissa) / 8.0f, exponent - 7);
}

void cast_fp8_blocks(const uint16_t* x, int64_t m, int64_t hidden_dim, bool round_scale, uint8_t* out,
                     float* scale_inv) {
  EW_REQUIRE(m >= 0, "cast_fp8_blocks: m must be >= 0, got ", m);
  EW_REQUIRE(hidden_dim > 0 && hidden_dim % kFp8BlockElements == 0,
             "cast_fp8_blocks: hidden_dim must be a multiple of ", kFp8BlockElements, ", got ", hidden_dim);
  constexpr float kInverseMax = 1.0f / kFp8E4m3Max;
  const int64_t blocks = hidden_dim / kFp8BlockElements;
  for (int64_t t = 0; t < m; ++t) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t first = t * hidden_dim + b * kFp8BlockElements;
      float amax = kFp8AmaxFloor;
      for (int64_t i = 0; i < kFp8BlockElements; ++i) amax = std::fmax(amax, std::fabs(bf16_to_float(x[first + i])));
      float scale, inverse;
      if (round_scale) {
        const int exponent = log2_ceil(amax * kInverseMax);
        scale = pow2(-exponent);
        inverse = pow2(exponent);
      } else {
        scale = kFp8E4m3Max / amax;
        inverse = amax * kInverseMax;
      }
      scale_inv[t * blocks + b] = inverse;
      for (int64_t i = 0; i < kFp8BlockElements; ++i) {
        out[first + i] = float_to_e4m3_satfinite(bf16_to_float(x[first + i]) * scale);
      }
    }
  }
}

uint8_t ue8m0_of(float power_of_two) {
  const uint32_t bits = float_bits(power_of_two);
  EW_REQUIRE(power_of_two > 0.0f && std::isnormal(power_of_two) && (bits & 0x7fffff) == 0,
             "ue8m0_of: the scale must be a positive normal power of two, got ", power_of_two);
  return uint8_t(bits >> 23);
}

}  // namespace expertwire::reference
