#include "core/config.h"

#include <cctype>
#include <cstdlib>
#include <limits>

#include "core/error.h"

namespace expertwire {
namespace {

void require_positive(const char* field, int64_t value) {
  EW_REQUIRE(value > 0, "AllToAllConfig.", field, " must be > 0, got ", value);
}

// Fields that reach 32-bit kernel arithmetic must fit in it.
void require_fits_u32(const char* field, int64_t value) {
  EW_REQUIRE(value <= int64_t(std::numeric_limits<uint32_t>::max() / 2), "AllToAllConfig.", field,
             " is too large for 32-bit device indexing, got ", value);
}

}  // namespace

void AllToAllConfig::validate() const {
  require_positive("max_num_tokens", max_num_tokens);
  require_positive("num_experts", num_experts);
  require_positive("experts_per_token", experts_per_token);
  require_positive("world_size", world_size);
  require_positive("dp_size", dp_size);
  require_positive("hidden_dim", hidden_dim);
  require_positive("hidden_dim_bytes", hidden_dim_bytes);
  EW_REQUIRE(hidden_dim_scale_bytes >= 0, "AllToAllConfig.hidden_dim_scale_bytes must be >= 0, got ",
             hidden_dim_scale_bytes);
  for (auto [field, value] : {std::pair{"max_num_tokens", max_num_tokens}, {"num_experts", num_experts},
                              {"world_size", world_size}, {"hidden_dim", hidden_dim},
                              {"hidden_dim_bytes", hidden_dim_bytes},
                              {"hidden_dim_scale_bytes", hidden_dim_scale_bytes}}) {
    require_fits_u32(field, value);
  }
  EW_REQUIRE(rank >= 0 && rank < world_size, "AllToAllConfig.rank must be in [0, world_size=", world_size,
             "), got ", rank);
  EW_REQUIRE(num_experts % world_size == 0, "AllToAllConfig.num_experts must be divisible by world_size=",
             world_size, ", got ", num_experts);
  EW_REQUIRE(world_size % dp_size == 0, "AllToAllConfig.world_size must be divisible by dp_size=", dp_size,
             ", got ", world_size);
  EW_REQUIRE(experts_per_token <= num_experts, "AllToAllConfig.experts_per_token must be <= num_experts=",
             num_experts, ", got ", experts_per_token);
  EW_REQUIRE(experts_per_token <= 0xffff, "AllToAllConfig.experts_per_token must be <= 65535, got ",
             experts_per_token);
  EW_REQUIRE(world_size / dp_size <= 0xffff, "AllToAllConfig: world_size / dp_size must be <= 65535, got ",
             world_size / dp_size);
  EW_REQUIRE(hidden_dim_bytes % 16 == 0,
             "AllToAllConfig.hidden_dim_bytes must be a multiple of 16 (tokens move as 16-byte vectors), got ",
             hidden_dim_bytes);
  EW_REQUIRE(hidden_dim_scale_bytes % 4 == 0,
             "AllToAllConfig.hidden_dim_scale_bytes must be a multiple of 4 (fp32 scales), got ",
             hidden_dim_scale_bytes);
  EW_REQUIRE(hidden_dim % 8 == 0,
             "AllToAllConfig.hidden_dim must be a multiple of 8 (combine moves 16-byte vectors of 16-bit values), got ",
             hidden_dim);
}

uint64_t parse_size_bytes(const std::string& text) {
  size_t pos = 0;
  while (pos < text.size() && std::isdigit(static_cast<unsigned char>(text[pos]))) ++pos;
  EW_REQUIRE(pos > 0 && pos + 1 >= text.size(), "malformed size '", text,
             "': expected digits with an optional K, M, G or T suffix");
  uint64_t value = std::strtoull(text.substr(0, pos).c_str(), nullptr, 10);
  if (pos == text.size()) return value;
  int shift = 0;
  switch (std::toupper(static_cast<unsigned char>(text[pos]))) {
    case 'K': shift = 10; break;
    case 'M': shift = 20; break;
    case 'G': shift = 30; break;
    case 'T': shift = 40; break;
    default:
      EW_THROW(ConfigError, "malformed size '", text, "': unknown suffix '", text[pos], "'");
  }
  EW_REQUIRE(value <= (std::numeric_limits<uint64_t>::max() >> shift), "size '", text, "' overflows 64 bits");
  return value << shift;
}

uint64_t symmetric_heap_bytes_from_env() {
  const char* text = std::getenv("NVSHMEM_SYMMETRIC_SIZE");
  return (text && *text) ? parse_size_bytes(text) : (1ull << 30);
}

uint64_t default_timeout_ns() {
  const char* text = std::getenv("EXPERTWIRE_TIMEOUT_MS");
  if (!text || !*text) return 10'000'000'000ull;
  char* end = nullptr;
  const unsigned long long ms = std::strtoull(text, &end, 10);
  EW_REQUIRE(end && *end == '\0' && ms > 0, "EXPERTWIRE_TIMEOUT_MS must be a positive integer, got '", text, "'");
  return uint64_t(ms) * 1'000'000ull;
}

}  // namespace expertwire
