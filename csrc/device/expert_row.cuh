// The caller's expert indices as the kernels read them, whichever type the caller wrote them in (IndexType).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "device/kernel_args.h"
#include "expertwire/config.h"

namespace expertwire::device {

// What an int64 index reads as when it is neither -1 nor below this value (negative, or at least 2^32 - 2): a
// value no configuration's num_experts reaches, so that it is refused as out of range.
inline constexpr uint32_t kUnrepresentableExpert = kNoExpert - 1;

// Token t's row of the caller's indices, each entry read as a 32-bit expert (kNoExpert: none), whatever the type
// the caller wrote it in. Host code (its unit test) reads host memory with it the same way.
class ExpertRow {
 public:
  __host__ __device__ __forceinline__ ExpertRow(const ExpertIndices& indices, uint32_t t, uint32_t top_k)
      : entries_(static_cast<const uint8_t*>(indices.data) +
                 (uint64_t(t) * top_k << (indices.type == IndexType::kInt64 ? 3 : 2))),
        wide_(indices.type == IndexType::kInt64) {}

  __host__ __device__ __forceinline__ uint32_t operator[](uint32_t k) const {
    if (!wide_) return reinterpret_cast<const uint32_t*>(entries_)[k];
    const int64_t v = reinterpret_cast<const int64_t*>(entries_)[k];
    return v == -1 ? kNoExpert : uint64_t(v) < kUnrepresentableExpert ? uint32_t(v) : kUnrepresentableExpert;
  }

  // Entry k as the caller wrote it (for the error record).
  __host__ __device__ __forceinline__ int64_t written(uint32_t k) const {
    return wide_ ? reinterpret_cast<const int64_t*>(entries_)[k]
                 : int64_t(reinterpret_cast<const uint32_t*>(entries_)[k]);
  }

 private:
  const uint8_t* entries_;
  bool wide_;
};

}  // namespace expertwire::device
