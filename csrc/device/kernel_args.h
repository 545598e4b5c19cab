// Arguments of the dispatch and combine kernels: plain structs that host code fills and passes by value.
#pragma once

#include <cstdint>

#include "device/rank_state.h"
#include "expertwire/params.h"
#include "expertwire/strided.h"

namespace expertwire::device {

// The caller's indices, [m][experts_per_token] packed entries of `type` (params.h IndexType); the kernels read
// them through ExpertRow (expert_row.cuh).
struct ExpertIndices {
  const void* data;
  IndexType type;
};

struct DispatchArgs {
  RankContext ctx;
  int32_t* out_expert_num_tokens;       // [num_local_experts]
  uint8_t* out_expert_x;                // [num_local_experts][max_recv_tokens][hidden_dim_bytes]
  Strided3D<float> out_expert_x_scale;  // [num_local_experts][max_recv_tokens][hidden_dim_scale_bytes / 4]
  Strided2D<const uint8_t> dp_x;        // [m][hidden_dim_bytes], bytes contiguous
  Strided2D<const float> dp_x_scale;    // [m][hidden_dim_scale_bytes / 4]
  ExpertIndices indices;
  uint32_t m;
  const uint32_t* bound_m;  // device; may be null (then m)
  bool do_send;
  bool do_recv;
  // dp_x / dp_x_scale are where the pull dispatch stages them (AllToAll::dispatch_input_buffer): not copied.
  bool dp_x_in_send_rows;
  bool dp_x_scale_in_send_rows;
  Fp8Cast cast;  // dp_x's bf16 rows cast to the fp8 payload on the way (params.h)
};

struct CombineArgs {
  RankContext ctx;
  void* out_tokens;  // [m][hidden_dim] OutT
  ExpertIndices indices;
  const float* weights;     // [m][experts_per_token]
  const uint8_t* expert_y;  // [num_local_experts][max_recv_tokens][hidden_dim] ExpertT
  uint32_t m;
  const uint32_t* bound_m;
  bool do_send;
  bool do_recv;
};

// Every block of every rank's launch must be resident at once (blocks wait on each other's peers), also when
// ranks share a GPU and their blocks share SMs. Kernels are compiled for blocks of at most kMaxBlockThreads
// threads, two blocks per SM: one block per SM (128 registers a thread) left no room to share, and 2 and 4 ranks
// on one H100 waited out their timeouts. That caps each thread at 64 registers; the copy and reduction loops are
// sized to fit them.
inline constexpr uint32_t kMaxBlockThreads = 512;
inline constexpr uint32_t kMinBlocksPerSm = 2;

}  // namespace expertwire::device
