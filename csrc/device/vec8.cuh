// Eight 16-bit values in one 16-byte vector, to and from floats: how combine reads expert rows and writes
// its outputs. One template over a traits pair per 16-bit type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "device/primitives.cuh"
#include "expertwire/dtype.h"

namespace expertwire::device {

// A 16-bit type's two-element vector and its conversions.
template <class T>
struct PairTraits;

template <>
struct PairTraits<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  __device__ static float2 to_float2(const Pair& pair) { return __bfloat1622float2(pair); }
  __device__ static Pair from_floats(float a, float b) { return __floats2bfloat162_rn(a, b); }
};

template <>
struct PairTraits<__half> {
  using Pair = __half2;
  __device__ static float2 to_float2(const Pair& pair) { return __half22float2(pair); }
  __device__ static Pair from_floats(float a, float b) { return __floats2half2_rn(a, b); }
};

// Eight values of T in an int4 <-> eight floats.
template <class T>
struct Vec8 {
  using Traits = PairTraits<T>;
  using Pair = typename Traits::Pair;

  __device__ static void to_float(const int4& raw, float* out) {
    const auto* pairs = reinterpret_cast<const Pair*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = Traits::to_float2(pairs[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
  __device__ static int4 pack(const float* in) {
    int4 raw;
    auto* pairs = reinterpret_cast<Pair*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) pairs[i] = Traits::from_floats(in[2 * i], in[2 * i + 1]);
    return raw;
  }
  __device__ static void store(T* dst, const float* in) { *reinterpret_cast<int4*>(dst) = pack(in); }
};

// float32 outputs are written as they are summed.
template <>
struct Vec8<float> {
  __device__ static void store(float* dst, const float* in) {
    reinterpret_cast<float4*>(dst)[0] = make_float4(in[0], in[1], in[2], in[3]);
    reinterpret_cast<float4*>(dst)[1] = make_float4(in[4], in[5], in[6], in[7]);
  }
};

// The ScalarType of rows of RowT, which travel at 16 bits.
template <class RowT>
__device__ constexpr ScalarType row_type_of() {
  static_assert(std::is_same_v<RowT, __nv_bfloat16> || std::is_same_v<RowT, __half>, "rows travel at 16 bits");
  return std::is_same_v<RowT, __half> ? ScalarType::kFloat16 : ScalarType::kBFloat16;
}

// Warp-wide copy of a float32 row of `elements` values (a multiple of 8) to `dst` as RowT (16-bit): a caller's
// float32 expert_y travels at the 16 bits of the out_tokens its readers write. Two vectors of 8 values in
// flight a lane (two 16-byte loads each), which keeps the pull combine's spills small.
template <class RowT>
__device__ __forceinline__ void warp_copy_floats_as(uint8_t* dst, const float* src, uint64_t elements) {
  struct EightFloats {
    int4 low, high;
  };
  const auto* s = reinterpret_cast<const int4*>(src);
  warp_copy_passes<2>(
      elements / 8, 1u,
      [s](uint64_t v) {
        return EightFloats{load_stream(s + 2 * v), load_stream(s + 2 * v + 1)};
      },
      [dst](int) { return reinterpret_cast<int4*>(dst); },
      [](int4* d, uint64_t v, const EightFloats& raw) {
        d[v] = Vec8<RowT>::pack(reinterpret_cast<const float*>(&raw));
      });
}

}  // namespace expertwire::device
