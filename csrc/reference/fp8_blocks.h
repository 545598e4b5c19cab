// CPU reference of the fp8 cast DeepEP's low-latency dispatch applies inside its send (the oracle a fused cast is
// checked against, bit for bit): every token's hidden_dim bf16 values in blocks of kFp8BlockElements, each block
// scaled so that its largest magnitude maps to the e4m3 maximum, then rounded to e4m3.
//   amax       = max(kFp8AmaxFloor, max |x| of the block), in float
//   plain      scale = 448 / amax, stored scale_inv = amax * (1 / 448)
//   round_scale  e = ceil(log2(amax * (1 / 448))) from the float's bits; scale = 2^-e, scale_inv = 2^e
//   value      e4m3(float(x) * scale), rounded to nearest even, saturated to +-448 (NaN stays NaN)
//   UE8M0      the biased exponent byte of a power-of-two scale_inv (round_scale only)
#pragma once

#include <cstdint>

namespace expertwire::reference {

inline constexpr int64_t kFp8BlockElements = 128;
inline constexpr float kFp8E4m3Max = 448.0f;
inline constexpr float kFp8AmaxFloor = 1e-4f;

// float -> e4m3 (finite-only variant, 0x7F / 0xFF are NaN): round to nearest even, saturate finite overflow.
uint8_t float_to_e4m3_satfinite(float value);
float e4m3_to_float(uint8_t code);

// x: [m][hidden_dim] bf16 bits, hidden_dim a multiple of kFp8BlockElements (else ConfigError). Writes
// out: [m][hidden_dim] e4m3 codes and scale_inv: [m][hidden_dim / kFp8BlockElements] (the factor that maps the
// e4m3 values back to x).
void cast_fp8_blocks(const uint16_t* x, int64_t m, int64_t hidden_dim, bool round_scale, uint8_t* out,
                     float* scale_inv);

// The UE8M0 byte of a power-of-two scale (its biased exponent); ConfigError for a value that is not a positive
// normal power of two.
uint8_t ue8m0_of(float power_of_two);

}  // namespace expertwire::reference
