// The arguments of AllToAll::dispatch and AllToAll::combine, by name. Shapes use the configuration's sizes:
// recv = max_recv_tokens() = max_num_tokens * world_size / dp_size, k = experts_per_token, s =
// hidden_dim_scale_bytes / 4 scale words. Pointers are device addresses on the all-to-all's GPU. With m = 0 the
// per-token arrays (dp_x, dp_x_scale, indices, weights, out_tokens) may be null, as empty torch tensors are.
#pragma once

#include <cstdint>

#include "expertwire/dtype.h"
#include "expertwire/strided.h"

namespace expertwire {

// What the send half does to dp_x's rows. kNone: they travel as they are. Otherwise dp_x holds bfloat16 rows of
// hidden_dim values (2 * hidden_dim bytes) that the send half casts to fp8 e4m3 with one scale per 128 values, as
// DeepEP's low-latency dispatch does (amax at least 1e-4 to 448, rounded to nearest even and saturated), into a
// configuration of hidden_dim_bytes = hidden_dim; dp_x_scale is then unused (null):
//   kBlockScales        float32 scales amax / 448, hidden_dim_scale_bytes = hidden_dim / 128 * 4;
//   kPowerOfTwoScales   float32 scales 2^ceil(log2(amax / 448)), the same size;
//   kUe8m0Scales        those powers of two as their exponent bytes, four to a word (block 4p + j in byte j of
//                       word p), hidden_dim_scale_bytes = hidden_dim / 512 * 4.
enum class Fp8Cast : uint8_t { kNone = 0, kBlockScales = 1, kPowerOfTwoScales = 2, kUe8m0Scales = 3 };

// How `indices` holds each token's experts. kUInt32: 32-bit words, kNoExpert for none (pplx_kernels' uint32
// indices). kInt64: 64-bit signed entries, -1 for none (DeepEP's int64 topk_idx), read by the kernels as they
// are, with no conversion pass; any other value outside [0, num_experts) is a bad index. Dispatch and combine
// each take either type.
enum class IndexType : uint8_t { kUInt32 = 0, kInt64 = 1 };

struct DispatchParams {
  // Outputs, written on the rank that owns the experts.
  int32_t* out_expert_num_tokens = nullptr;  // [num_local_experts]: rows received per local expert
  uint8_t* out_expert_x = nullptr;           // [num_local_experts][recv][hidden_dim_bytes], packed
  Strided3D<float> out_expert_x_scale;       // [num_local_experts][recv][s] words at any strides (multiples of
                                             // 4 bytes, no two words at one address); data null without scales
  // Inputs: this rank's tokens. dp_x's bytes are contiguous in a row (element_stride 1), its rows any multiple
  // of 16 bytes apart; the dispatch input buffers (AllToAll::dispatch_input_buffer) are valid inputs too.
  Strided2D<const uint8_t> dp_x;      // [m][hidden_dim_bytes]
  Strided2D<const float> dp_x_scale;  // [m][s] words at any strides (multiples of 4 bytes); null without scales
  const void* indices = nullptr;      // [m][k] packed, of index_type: the experts of each token
  IndexType index_type = IndexType::kUInt32;
  uint32_t m = 0;  // tokens, <= max_num_tokens
  // Optional device address of the real token count (<= m), read by the kernels: a CUDA graph can replay the
  // call with another count.
  const uint32_t* bound_m = nullptr;
  SplitMode split = SplitMode::kNone;
  Fp8Cast cast = Fp8Cast::kNone;
};

struct CombineParams {
  // Output: out_tokens[t] = sum_k weights[t][k] * expert_y(expert indices[t][k], t) for t < m, summed in fp32.
  void* out_tokens = nullptr;  // [m][hidden_dim] of out_type, packed
  ScalarType out_type = ScalarType::kBFloat16;
  const void* indices = nullptr;  // [m][k] packed, of index_type: the experts dispatch sent each token to
  IndexType index_type = IndexType::kUInt32;
  const float* weights = nullptr;  // [m][k] packed
  // [num_local_experts][recv][hidden_dim] of expert_type (bfloat16 or float16; float32 with 16-bit out_tokens,
  // whose type its rows are rounded to before they travel), packed: row i of local expert e is the output for
  // the token dispatch delivered to out_expert_x[e][i]. May be AllToAll::expert_output_buffer().
  const void* expert_y = nullptr;
  ScalarType expert_type = ScalarType::kBFloat16;
  uint32_t m = 0;
  const uint32_t* bound_m = nullptr;
  SplitMode split = SplitMode::kNone;
};

}  // namespace expertwire
