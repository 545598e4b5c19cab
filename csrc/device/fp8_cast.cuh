// The fp8 cast of DeepEP's low-latency dispatch, fused into the send (DispatchParams::cast): a token's bf16 row
// becomes e4m3 values with one scale per 128 of them, written where the token travels from.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "device/primitives.cuh"
#include "expertwire/params.h"

namespace expertwire::device {

constexpr float kFp8E4m3Max = 448.0f;
constexpr float kFp8AmaxFloor = 1e-4f;
constexpr uint32_t kFp8BlockValues = 128;
constexpr uint32_t kFp8LanesPerBlock = kFp8BlockValues / 8;  // a lane casts 8 values at a time

// Casts the `hidden` bf16 values at `x` (16-byte aligned) with the whole warp: e4m3 values to `payload`, and per
// 128 values the factor back (float32, or its exponent byte with kUe8m0Scales) to `scales`. Numerics as
// reference::cast_fp8_blocks: amax of the block's magnitudes (NaN ignored, at least 1e-4), scale 448 / amax (a
// correctly rounded division) or 2^-ceil(log2(amax / 448)), values times scale rounded to nearest even and
// saturated.
__device__ __forceinline__ void warp_cast_fp8_row(uint8_t* payload, uint8_t* scales, const uint8_t* x, uint32_t hidden,
                                                  Fp8Cast cast) {
  const auto* in = reinterpret_cast<const int4*>(x);
  const uint32_t vectors = hidden / 8;
  const uint32_t passes = (vectors + kWarpSize - 1) / kWarpSize;  // warp-uniform, for the shuffles
  for (uint32_t pass = 0; pass < passes; ++pass) {
    const uint32_t v = pass * kWarpSize + uint32_t(lane_id());
    const bool active = v < vectors;
    float values[8] = {};
    float amax = 0.0f;
    if (active) {
      const int4 raw = load_stream(in + v);
      const auto* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 pair = __bfloat1622float2(pairs[i]);
        values[2 * i] = pair.x;
        values[2 * i + 1] = pair.y;
      }
#pragma unroll
      for (float value : values) amax = fmaxf(amax, fabsf(value));
    }
    // The 16 lanes of a block share its amax (hidden is a multiple of 128: a block never spans two passes).
#pragma unroll
    for (uint32_t offset = kFp8LanesPerBlock / 2; offset > 0; offset /= 2) {
      amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, int(offset)));
    }
    if (!active) continue;
    amax = fmaxf(amax, kFp8AmaxFloor);
    float scale, inverse;
    if (cast == Fp8Cast::kBlockScales) {
      scale = __fdiv_rn(kFp8E4m3Max, amax);
      inverse = __fmul_rn(amax, 1.0f / kFp8E4m3Max);
    } else {
      const uint32_t bits = __float_as_uint(__fmul_rn(amax, 1.0f / kFp8E4m3Max));
      const int exponent = int((bits >> 23) & 0xff) - 127 + ((bits & 0x7fffff) != 0 ? 1 : 0);
      scale = __uint_as_float(uint32_t(127 - exponent) << 23);
      inverse = __uint_as_float(uint32_t(exponent + 127) << 23);
    }
    uint2 out;
    auto* codes = reinterpret_cast<__nv_fp8x2_storage_t*>(&out);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 scaled = make_float2(__fmul_rn(values[2 * i], scale), __fmul_rn(values[2 * i + 1], scale));
      codes[i] = __nv_cvt_float2_to_fp8x2(scaled, __NV_SATFINITE, __NV_E4M3);
    }
    // The conversion drops a NaN's sign; the reference keeps it.
    auto* bytes = reinterpret_cast<uint8_t*>(&out);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (isnan(values[i])) bytes[i] = uint8_t((__float_as_uint(values[i]) >> 24) & 0x80u) | 0x7fu;
    }
    reinterpret_cast<uint2*>(payload)[v] = out;
    if (v % kFp8LanesPerBlock == 0) {
      const uint32_t block = v / kFp8LanesPerBlock;
      if (cast == Fp8Cast::kUe8m0Scales) {
        scales[block] = uint8_t(__float_as_uint(inverse) >> 23);
      } else {
        reinterpret_cast<float*>(scales)[block] = inverse;
      }
    }
  }
}

}  // namespace expertwire::device
