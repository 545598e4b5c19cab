// Deterministic test and benchmark data: every rank can rebuild every DP group's tokens from the seed,
// which is what the reference model needs to predict what each rank receives.
#pragma once

#include <cstdint>
#include <vector>

#include "expertwire/config.h"
#include "expertwire/dtype.h"
#include "reference/reference.h"

namespace expertwire::harness {

// splitmix64: small, fast, and the same on every rank.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t next();
  uint32_t below(uint32_t bound) { return uint32_t(next() % bound); }
  float uniform(float lo, float hi) { return lo + (hi - lo) * float(next() >> 40) / float(1ull << 24); }

 private:
  uint64_t state_;
};

uint64_t mix_seed(uint64_t seed, uint64_t a, uint64_t b = 0);

// A random expert in [0, num_experts) that is none of the row's first `filled` entries.
uint32_t draw_new_expert(Rng& rng, const uint32_t* row, int64_t filled, uint32_t num_experts);

struct GroupData {
  int64_t m = 0;
  std::vector<uint8_t> x;         // [max_num_tokens][hidden_dim_bytes]; rows >= m are never sent
  std::vector<uint8_t> x_scale;   // [max_num_tokens][hidden_dim_scale_bytes]
  std::vector<uint32_t> indices;  // [max_num_tokens][experts_per_token]
  std::vector<float> weights;     // [max_num_tokens][experts_per_token]

  reference::GroupInput input() const;
};

// Tokens of DP group `group`: random payload whose first 8 bytes name (group, token) so a received row
// can be keyed back to its source, random fp32 scales, distinct random experts per row, weights in [0, 1). With
// `no_expert_slots`, about one slot in four is kNoExpert instead.
GroupData make_group_data(const AllToAllConfig& config, uint32_t group, int64_t m, uint64_t seed,
                          bool no_expert_slots = false);

void read_marker(const uint8_t* row, uint32_t* group, uint32_t* token);

// What the test's experts output for token `token` of DP group `group`: hidden_dim values in [-1, 1] drawn from
// the token's coordinates, already rounded to `type` (bfloat16 or float16) as the GPU holds them, or exact for
// float32. Rounding a float32 row to a 16-bit type gives that type's row.
void expert_output_row(uint32_t expert, uint32_t group, uint32_t token, ScalarType type, int64_t hidden_dim,
                       float* out);

// Bits of `value` in a 16-bit `type` (bfloat16 or float16), and back.
uint16_t to_bits16(float value, ScalarType type);
float from_bits16(uint16_t bits, ScalarType type);

}  // namespace expertwire::harness
