// Element types of combine's tensors, and pplx_kernels' split of an operation into halves.
#pragma once

#include <cstdint>

namespace expertwire {

enum class ScalarType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline const char* scalar_type_name(ScalarType type) {
  switch (type) {
    case ScalarType::kFloat32: return "float32";
    case ScalarType::kBFloat16: return "bfloat16";
    case ScalarType::kFloat16: return "float16";
  }
  return "unknown";
}

inline uint32_t scalar_type_size(ScalarType type) { return type == ScalarType::kFloat32 ? 4 : 2; }

// A send half and a receive half, launched separately so that other work can run in between; kNone runs both.
enum class SplitMode : int32_t { kNone = 0, kSend = 1, kRecv = 2 };

}  // namespace expertwire
