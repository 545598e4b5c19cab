#include "tests/common/workload.h"

#include <algorithm>
#include <cstring>

namespace expertwire::harness {

uint64_t Rng::next() {
  uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t mix_seed(uint64_t seed, uint64_t a, uint64_t b) {
  Rng rng(seed ^ (a * 0x632be59bd9b4e019ull) ^ (b * 0x8cb92ba72f3d8dd7ull));
  return rng.next();
}

reference::GroupInput GroupData::input() const {
  reference::GroupInput in;
  in.m = m;
  in.x = x.data();
  in.x_scale = x_scale.empty() ? nullptr : x_scale.data();
  in.indices = indices.data();
  in.weights = weights.data();
  return in;
}

uint32_t draw_new_expert(Rng& rng, const uint32_t* row, int64_t filled, uint32_t num_experts) {
  uint32_t expert;
  do {
    expert = rng.below(num_experts);
  } while (std::find(row, row + filled, expert) != row + filled);
  return expert;
}

GroupData make_group_data(const AllToAllConfig& config, uint32_t group, int64_t m, uint64_t seed,
                          bool no_expert_slots) {
  const int64_t rows = config.max_num_tokens, top_k = config.experts_per_token;
  GroupData data;
  data.m = m;
  data.x.resize(rows * config.hidden_dim_bytes);
  data.x_scale.resize(rows * config.hidden_dim_scale_bytes);
  data.indices.resize(rows * top_k);
  data.weights.resize(rows * top_k);
  Rng rng(mix_seed(seed, group, 0x5eed));
  // Eight bytes per draw: soak runs rebuild every group's tokens for every call.
  for (size_t i = 0; i < data.x.size(); i += sizeof(uint64_t)) {
    const uint64_t word = rng.next();
    std::memcpy(&data.x[i], &word, std::min(sizeof(word), data.x.size() - i));
  }
  for (int64_t t = 0; t < rows; ++t) {
    const uint32_t marker[2] = {group, uint32_t(t)};
    std::memcpy(&data.x[t * config.hidden_dim_bytes], marker, sizeof(marker));
  }
  for (size_t i = 0; i + 4 <= data.x_scale.size(); i += 4) {
    const float scale = rng.uniform(0.01f, 2.0f);
    std::memcpy(&data.x_scale[i], &scale, 4);
  }
  for (int64_t t = 0; t < rows; ++t) {
    uint32_t* row = &data.indices[t * top_k];
    for (int64_t k = 0; k < top_k; ++k) {
      row[k] = draw_new_expert(rng, row, k, uint32_t(config.num_experts));
      data.weights[t * top_k + k] = rng.uniform(0.0f, 1.0f);
    }
    // Drawn after the row is complete, so the experts of the other slots are those of the row without it.
    if (no_expert_slots) {
      for (int64_t k = 0; k < top_k; ++k) {
        if (rng.below(4) == 0) row[k] = kNoExpert;
      }
    }
  }
  return data;
}

void read_marker(const uint8_t* row, uint32_t* group, uint32_t* token) {
  uint32_t marker[2];
  std::memcpy(marker, row, sizeof(marker));
  *group = marker[0];
  *token = marker[1];
}

uint16_t to_bits16(float value, ScalarType type) {
  return type == ScalarType::kBFloat16 ? reference::float_to_bf16(value) : reference::float_to_half(value);
}

float from_bits16(uint16_t bits, ScalarType type) {
  return type == ScalarType::kBFloat16 ? reference::bf16_to_float(bits) : reference::half_to_float(bits);
}

void expert_output_row(uint32_t expert, uint32_t group, uint32_t token, ScalarType type, int64_t hidden_dim,
                       float* out) {
  Rng rng(mix_seed(expert, group, token));
  for (int64_t h = 0; h < hidden_dim; ++h) {
    const float value = rng.uniform(-1.0f, 1.0f);
    out[h] = type == ScalarType::kFloat32 ? value : from_bits16(to_bits16(value, type), type);
  }
}

}  // namespace expertwire::harness
