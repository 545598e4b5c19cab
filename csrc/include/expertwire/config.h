// The configuration of an all-to-all object, and its validation.
#pragma once

#include <cstdint>

namespace expertwire {

// An entry of indices that names no expert (-1 as an int32, as DeepEP's topk_idx has it): its slot sends and
// receives nothing, without an error.
inline constexpr uint32_t kNoExpert = 0xFFFFFFFFu;

struct AllToAllConfig {
  int64_t max_num_tokens = 0;          // tokens per DP group per call, upper bound
  int64_t num_experts = 0;             // global expert count
  int64_t experts_per_token = 0;       // top-k
  int64_t rank = 0;                    // this rank in [0, world_size)
  int64_t world_size = 0;              // ranks taking part
  int64_t dp_size = 1;                 // consecutive ranks that hold the same tokens
  int64_t hidden_dim = 0;              // elements per token (combine payload is hidden_dim * 2 bytes)
  int64_t hidden_dim_bytes = 0;        // dispatch payload bytes per token (fp8: hidden_dim, bf16: 2*hidden_dim)
  int64_t hidden_dim_scale_bytes = 0;  // dispatch scale bytes per token (0: no scales)

  int64_t num_local_experts() const { return num_experts / world_size; }
  int64_t num_dp_groups() const { return world_size / dp_size; }
  int64_t dp_group() const { return rank / dp_size; }
  int64_t dp_rank() const { return rank % dp_size; }
  // Rows of out_expert_x per local expert: every DP group may send each of its tokens once.
  int64_t max_recv_tokens() const { return max_num_tokens * num_dp_groups(); }

  // Throws ConfigError naming the first invalid field and its value.
  void validate() const;
};

// A configuration from pplx_kernels' constructor arguments, in their order. Not validated.
AllToAllConfig make_config(int64_t max_num_tokens, int64_t num_experts, int64_t experts_per_token, int64_t rank,
                           int64_t world_size, int64_t dp_size, int64_t hidden_dim, int64_t hidden_dim_bytes,
                           int64_t hidden_dim_scale_bytes);

}  // namespace expertwire
