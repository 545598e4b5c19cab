// CPU reference model of dispatch and combine: the oracle of every GPU test.
//
// Semantics (pplx_kernels'):
//  * Ranks form DP groups of dp_size consecutive ranks; every rank of a group holds the same tokens.
//  * Expert e lives on rank e / num_local_experts as local expert e % num_local_experts.
//  * Dispatch: every token t < m of every DP group g is delivered once to each expert in indices[t][*];
//    on the owner rank, out_expert_num_tokens[le] counts them and out_expert_x[le][0..count) holds their
//    payload (and scales). The order of rows inside one expert's block is not defined, so comparisons key
//    every row by (source DP group, token index). A kNoExpert entry delivers nothing.
//  * Combine: on every rank of group g, out[t] = sum_k weights[t][k] * expert_y[indices[t][k]](g, t),
//    accumulated in fp32 in k order over the entries that are not kNoExpert, then cast to the output type.
//    Rows t >= m are left untouched.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "expertwire/config.h"

namespace expertwire::reference {

// The tokens one DP group holds for one call.
struct GroupInput {
  int64_t m = 0;                      // tokens of this group in the call (bound_m)
  const uint8_t* x = nullptr;         // [m][hidden_dim_bytes]
  const uint8_t* x_scale = nullptr;   // [m][hidden_dim_scale_bytes]; may be null when scale bytes are 0
  const uint32_t* indices = nullptr;  // [m][experts_per_token], distinct experts per row (kNoExpert: none)
  const float* weights = nullptr;     // [m][experts_per_token]; read by combine only
};

struct ReceivedToken {
  uint32_t source_group = 0;
  uint32_t token = 0;
  const uint8_t* x = nullptr;        // points into the sender's GroupInput::x row
  const uint8_t* x_scale = nullptr;  // points into the sender's GroupInput::x_scale row, or null
};

// What one local expert receives, sorted by (source_group, token).
struct ExpertInbox {
  std::vector<ReceivedToken> tokens;
};

// Dispatch as seen by rank config.rank: one inbox per local expert.
// `groups` has config.num_dp_groups() entries. Throws ConfigError on an index >= num_experts, a repeated
// expert within one token's row, or m outside [0, max_num_tokens].
std::vector<ExpertInbox> dispatch(const AllToAllConfig& config, const std::vector<GroupInput>& groups);

// The output row of global expert `expert` for token `token` of DP group `group`: hidden_dim floats, the
// exact values the expert produced (already rounded to the 16-bit type the GPU holds).
using ExpertOutputFn = std::function<const float*(uint32_t expert, uint32_t group, uint32_t token)>;

// Combine for DP group `group`: writes out[t][0..hidden_dim) for t < input.m, in fp32.
void combine(const AllToAllConfig& config, uint32_t group, const GroupInput& input, const ExpertOutputFn& expert_output,
             float* out);

// A float's bits and back.
uint32_t float_bits(float value);
float float_from_bits(uint32_t bits);

// Host conversions that match the GPU's (round to nearest even).
uint16_t float_to_bf16(float value);
float bf16_to_float(uint16_t value);
uint16_t float_to_half(float value);
float half_to_float(uint16_t value);

}  // namespace expertwire::reference
