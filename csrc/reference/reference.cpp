#include "reference/reference.h"

#include <cstring>

#include "core/error.h"

namespace expertwire::reference {
namespace {

// Checks one group's routing the way the GPU path must reject it, so a bad test input fails loudly here
// instead of producing a plausible-looking oracle. `seen_row`/`seen_k` are scratch of num_experts entries,
// reused across rows: seen_row[e] holds (row serial + 1) of the last row that used expert e, which makes
// the duplicate check O(top-k) per row without clearing the table between rows.
void validate_group(const AllToAllConfig& config, const char* caller, int64_t group, const GroupInput& input,
                    std::vector<uint64_t>& seen_row, std::vector<int64_t>& seen_k, uint64_t& row_serial) {
  EW_REQUIRE(input.m >= 0 && input.m <= config.max_num_tokens, "reference::", caller, ": group ", group,
             ": m=", input.m, " is outside [0, max_num_tokens=", config.max_num_tokens, "]");
  if (input.m == 0) return;
  EW_REQUIRE(input.indices != nullptr, "reference::", caller, ": group ", group, ": indices is null with m=", input.m);

  const int64_t top_k = config.experts_per_token;
  for (int64_t token = 0; token < input.m; ++token) {
    const uint64_t row_tag = ++row_serial;
    for (int64_t k = 0; k < top_k; ++k) {
      const uint32_t expert = input.indices[token * top_k + k];
      if (expert == kNoExpert) continue;
      EW_REQUIRE(int64_t(expert) < config.num_experts, "reference::", caller, ": group ", group, ", token ", token,
                 ", k ", k, ": expert index ", expert, " is out of range [0, num_experts=", config.num_experts, ")");
      EW_REQUIRE(seen_row[expert] != row_tag, "reference::", caller, ": group ", group, ", token ", token, ", k ", k,
                 ": expert index ", expert, " repeats the expert at k ", seen_k[expert], " of the same row");
      seen_row[expert] = row_tag;
      seen_k[expert] = k;
    }
  }
}

// Drops the low `shift` bits of `value`, rounding to nearest with ties to even. Any carry out of the kept
// bits is left in place on purpose: for packed float formats it bumps the exponent, which is exactly the
// correct result (largest mantissa rounds up to the next power of two, or to infinity).
uint32_t shift_right_round_even(uint32_t value, int shift) {
  const uint32_t kept = value >> shift;
  const uint32_t dropped = value & ((1u << shift) - 1);
  const uint32_t halfway = 1u << (shift - 1);
  const bool round_up = dropped > halfway || (dropped == halfway && (kept & 1u));
  return kept + (round_up ? 1u : 0u);
}

constexpr uint32_t kFloatSignMask = 0x80000000u;
constexpr uint32_t kFloatExponentMask = 0x7F800000u;
constexpr uint32_t kFloatMantissaMask = 0x007FFFFFu;
constexpr uint32_t kFloatQuietBit = 0x00400000u;

bool is_nan_bits(uint32_t bits) {
  return (bits & kFloatExponentMask) == kFloatExponentMask && (bits & kFloatMantissaMask) != 0;
}

}  // namespace

uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

float float_from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

std::vector<ExpertInbox> dispatch(const AllToAllConfig& config, const std::vector<GroupInput>& groups) {
  config.validate();
  EW_REQUIRE(int64_t(groups.size()) == config.num_dp_groups(), "reference::dispatch: got ", groups.size(),
             " groups, expected num_dp_groups=", config.num_dp_groups(), " (world_size=", config.world_size,
             " / dp_size=", config.dp_size, ")");

  // Validate everything before producing anything, so a caller never sees a half-filled result.
  std::vector<uint64_t> seen_row(size_t(config.num_experts), 0);
  std::vector<int64_t> seen_k(size_t(config.num_experts), 0);
  uint64_t row_serial = 0;
  for (size_t group = 0; group < groups.size(); ++group) {
    const GroupInput& input = groups[group];
    validate_group(config, "dispatch", int64_t(group), input, seen_row, seen_k, row_serial);
    if (input.m == 0) continue;
    EW_REQUIRE(input.x != nullptr, "reference::dispatch: group ", group, ": x is null with m=", input.m);
    EW_REQUIRE(config.hidden_dim_scale_bytes == 0 || input.x_scale != nullptr, "reference::dispatch: group ", group,
               ": x_scale is null with hidden_dim_scale_bytes=", config.hidden_dim_scale_bytes);
  }

  const int64_t num_local_experts = config.num_local_experts();
  const int64_t first_expert = config.rank * num_local_experts;
  const int64_t top_k = config.experts_per_token;
  std::vector<ExpertInbox> inboxes(static_cast<size_t>(num_local_experts));

  // Walking groups and tokens in ascending order yields every inbox already sorted by (group, token);
  // a row names each expert at most once, so no token lands twice in one inbox.
  for (size_t group = 0; group < groups.size(); ++group) {
    const GroupInput& input = groups[group];
    for (int64_t token = 0; token < input.m; ++token) {
      for (int64_t k = 0; k < top_k; ++k) {
        const int64_t local_expert = int64_t(input.indices[token * top_k + k]) - first_expert;
        if (local_expert < 0 || local_expert >= num_local_experts) continue;
        ReceivedToken received;
        received.source_group = uint32_t(group);
        received.token = uint32_t(token);
        received.x = input.x + token * config.hidden_dim_bytes;
        received.x_scale =
            config.hidden_dim_scale_bytes == 0 ? nullptr : input.x_scale + token * config.hidden_dim_scale_bytes;
        inboxes[size_t(local_expert)].tokens.push_back(received);
      }
    }
  }
  return inboxes;
}

void combine(const AllToAllConfig& config, uint32_t group, const GroupInput& input, const ExpertOutputFn& expert_output,
             float* out) {
  config.validate();
  EW_REQUIRE(int64_t(group) < config.num_dp_groups(), "reference::combine: group ", group,
             " is out of range [0, num_dp_groups=", config.num_dp_groups(), ")");

  std::vector<uint64_t> seen_row(size_t(config.num_experts), 0);
  std::vector<int64_t> seen_k(size_t(config.num_experts), 0);
  uint64_t row_serial = 0;
  validate_group(config, "combine", group, input, seen_row, seen_k, row_serial);
  if (input.m == 0) return;
  EW_REQUIRE(input.weights != nullptr, "reference::combine: group ", group, ": weights is null with m=", input.m);
  EW_REQUIRE(out != nullptr, "reference::combine: group ", group, ": out is null with m=", input.m);

  const int64_t top_k = config.experts_per_token;
  const int64_t hidden_dim = config.hidden_dim;
  std::vector<const float*> rows(static_cast<size_t>(top_k));
  for (int64_t token = 0; token < input.m; ++token) {
    const uint32_t* token_experts = input.indices + token * top_k;
    const float* token_weights = input.weights + token * top_k;
    for (int64_t k = 0; k < top_k; ++k) {
      rows[size_t(k)] = nullptr;
      if (token_experts[k] == kNoExpert) continue;  // adds nothing, as on the GPU
      rows[size_t(k)] = expert_output(token_experts[k], group, uint32_t(token));
      EW_REQUIRE(rows[size_t(k)] != nullptr, "reference::combine: group ", group, ", token ", token, ", k ", k,
                 ": expert_output returned null for expert ", token_experts[k]);
    }
    float* out_row = out + token * hidden_dim;
    for (int64_t h = 0; h < hidden_dim; ++h) {
      // fp32 and strictly k order: the GPU reduces the same way, and float addition is not associative,
      // so any other order (or a wider accumulator) could differ from it in the last bit.
      float acc = 0.0f;
      for (int64_t k = 0; k < top_k; ++k) {
        if (rows[size_t(k)] != nullptr) acc += token_weights[k] * rows[size_t(k)][h];
      }
      out_row[h] = acc;
    }
  }
}

uint16_t float_to_bf16(float value) {
  const uint32_t bits = float_bits(value);
  if (is_nan_bits(bits)) {
    // Rounding could carry a NaN whose payload sits only in the low 16 bits into Inf; force the quiet bit
    // so the result stays a NaN with the sign and top payload bits kept.
    return uint16_t((bits | kFloatQuietBit) >> 16);
  }
  // bf16 is the top half of a float, so rounding the low 16 bits is the whole conversion; a carry into
  // the exponent rounds the largest finite values to Inf, as IEEE requires.
  return uint16_t(shift_right_round_even(bits, 16));
}

float bf16_to_float(uint16_t value) {
  uint32_t bits = uint32_t(value) << 16;
  if (is_nan_bits(bits)) bits |= kFloatQuietBit;
  return float_from_bits(bits);
}

uint16_t float_to_half(float value) {
  const uint32_t bits = float_bits(value);
  const uint16_t sign = uint16_t((bits & kFloatSignMask) >> 16);
  const uint32_t magnitude = bits & ~kFloatSignMask;

  constexpr uint16_t kHalfInf = 0x7C00;
  constexpr uint16_t kHalfQuietBit = 0x0200;
  if (magnitude >= kFloatExponentMask) {
    if (magnitude == kFloatExponentMask) return uint16_t(sign | kHalfInf);
    // Keep the top payload bits; the quiet bit guarantees a payload that only had low bits stays a NaN.
    return uint16_t(sign | kHalfInf | kHalfQuietBit | ((magnitude & kFloatMantissaMask) >> 13));
  }
  // 65536 and above round to Inf whatever their mantissa; below that the rounding carry reaches Inf on its own
  // (65520 and up), so only this cut-off is needed to keep the exponent arithmetic below in range.
  constexpr uint32_t kFloat65536 = 0x47800000u;
  if (magnitude >= kFloat65536) return uint16_t(sign | kHalfInf);

  const int float_exponent = int(magnitude >> 23);  // biased by 127
  constexpr int kSmallestNormalHalfExponent = 113;  // 2^-14 as a biased float exponent
  if (float_exponent >= kSmallestNormalHalfExponent) {
    // Rebias 127 -> 15 while still packed, then drop 13 mantissa bits; a carry bumps the exponent correctly.
    const uint32_t rebiased = magnitude - (uint32_t(127 - 15) << 23);
    return uint16_t(sign | shift_right_round_even(rebiased, 13));
  }

  // Half subnormal (or zero): the result is significand * 2^(exponent - 150) / 2^-24, a right shift by
  // 126 - exponent of the 24-bit significand. A carry out of the 10 subnormal bits produces 0x0400, the
  // smallest normal half, which is again the correctly rounded result.
  const int shift = 126 - float_exponent;
  // Below 2^-25 (shift > 24) everything rounds to zero; 2^-25 itself is a tie that rounds to even zero,
  // which the general path handles with shift == 24.
  if (shift > 24) return sign;
  const uint32_t significand = (magnitude & kFloatMantissaMask) | 0x00800000u;
  return uint16_t(sign | shift_right_round_even(significand, shift));
}

float half_to_float(uint16_t value) {
  const uint32_t sign = uint32_t(value & 0x8000u) << 16;
  const uint32_t exponent = (value >> 10) & 0x1Fu;
  uint32_t mantissa = value & 0x3FFu;

  if (exponent == 0x1F) {
    if (mantissa == 0) return float_from_bits(sign | kFloatExponentMask);
    return float_from_bits(sign | kFloatExponentMask | kFloatQuietBit | (mantissa << 13));
  }
  if (exponent == 0) {
    if (mantissa == 0) return float_from_bits(sign);
    // Every half subnormal is a normal float: shift the leading one up to the implicit-bit position and
    // lower the exponent by one per shift, starting from the exponent of 2^-14.
    int float_exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --float_exponent;
    }
    return float_from_bits(sign | (uint32_t(float_exponent) << 23) | ((mantissa & 0x3FFu) << 13));
  }
  return float_from_bits(sign | ((exponent + (127 - 15)) << 23) | (mantissa << 13));
}

}  // namespace expertwire::reference
