#include "expertwire/config.h"

#include <cctype>
#include <cmath>
#include <cstdlib>
#include <limits>

#include "core/env.h"
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
  for (auto [field, value] : {std::pair{"max_num_tokens", max_num_tokens},
                              {"num_experts", num_experts},
                              {"world_size", world_size},
                              {"hidden_dim", hidden_dim},
                              {"hidden_dim_bytes", hidden_dim_bytes},
                              {"hidden_dim_scale_bytes", hidden_dim_scale_bytes}}) {
    require_fits_u32(field, value);
  }
  EW_REQUIRE(rank >= 0 && rank < world_size, "AllToAllConfig.rank must be in [0, world_size=", world_size, "), got ",
             rank);
  EW_REQUIRE(num_experts % world_size == 0, "AllToAllConfig.num_experts must be divisible by world_size=", world_size,
             ", got ", num_experts);
  EW_REQUIRE(world_size % dp_size == 0, "AllToAllConfig.world_size must be divisible by dp_size=", dp_size, ", got ",
             world_size);
  EW_REQUIRE(experts_per_token <= num_experts, "AllToAllConfig.experts_per_token must be <= num_experts=", num_experts,
             ", got ", experts_per_token);
  EW_REQUIRE(max_num_tokens * (world_size / dp_size) <= int64_t(std::numeric_limits<uint32_t>::max() / 2),
             "AllToAllConfig: max_num_tokens * world_size / dp_size (rows per local expert) is too large for 32-bit "
             "device indexing, got ",
             max_num_tokens * (world_size / dp_size));
  // The combine counts its work items (runs of a token's 256-element chunks) in 32 bits on the device.
  const int64_t combine_chunks = max_num_tokens * ((hidden_dim + 255) / 256);
  EW_REQUIRE(combine_chunks <= int64_t(std::numeric_limits<uint32_t>::max() / 2),
             "AllToAllConfig: max_num_tokens * ceil(hidden_dim / 256) (combine work items) is too large for 32-bit "
             "device indexing, got ",
             combine_chunks);
  // The pull dispatch announces m + 1 in a 24-bit field of its arrival signal (core/layout.h).
  EW_REQUIRE(max_num_tokens < 0xffffff, "AllToAllConfig.max_num_tokens must be < 16777215, got ", max_num_tokens);
  EW_REQUIRE(experts_per_token <= 0xffff, "AllToAllConfig.experts_per_token must be <= 65535, got ", experts_per_token);
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

namespace {

// Digits only: strtoull would accept signs and spaces and wrap negative values.
bool parse_decimal(const std::string& digits, uint64_t* value) {
  if (digits.empty()) return false;
  uint64_t out = 0;
  for (const char ch : digits) {
    if (!std::isdigit(static_cast<unsigned char>(ch))) return false;
    if (__builtin_mul_overflow(out, 10u, &out) || __builtin_add_overflow(out, uint64_t(ch - '0'), &out)) return false;
  }
  *value = out;
  return true;
}

}  // namespace

uint64_t parse_size_bytes(const std::string& text) {
  // NVSHMEM's format, as its documentation gives it: a non-negative integer or decimal number (".5" and an
  // exponent allowed), then an optional scaling suffix k, m, g or t (either case, powers of 2^10) after which
  // anything is ignored ("2GB" is 2 GiB); the size is the ceiling of the product. Parsing it the same way keeps
  // the heap size checked here the one NVSHMEM allocates.
  const auto digit_at = [&](size_t i) { return i < text.size() && std::isdigit(static_cast<unsigned char>(text[i])); };
  size_t pos = 0;
  while (pos < text.size() && std::isspace(static_cast<unsigned char>(text[pos]))) ++pos;
  const size_t begin = pos;
  while (digit_at(pos)) ++pos;
  const size_t integer_end = pos;
  bool fractional = false;
  if (pos < text.size() && text[pos] == '.') {
    fractional = true;
    ++pos;
    while (digit_at(pos)) ++pos;
  }
  const bool has_digits = integer_end > begin || pos > integer_end + 1;
  if (has_digits && pos < text.size() && (text[pos] == 'e' || text[pos] == 'E')) {
    size_t exponent = pos + 1;
    if (exponent < text.size() && (text[exponent] == '+' || text[exponent] == '-')) ++exponent;
    if (digit_at(exponent)) {
      fractional = true;
      pos = exponent;
      while (digit_at(pos)) ++pos;
    }
  }
  const std::string number = text.substr(begin, pos - begin);
  uint64_t integer = 0;
  EW_REQUIRE(has_digits && (fractional || parse_decimal(number, &integer)), "malformed size '", text,
             "': expected a non-negative number (an integer of at most 64 bits, or a decimal) with an optional k, m, "
             "g or t suffix");
  int shift = 0;
  if (pos < text.size()) {
    switch (std::toupper(static_cast<unsigned char>(text[pos]))) {
      case 'K': shift = 10; break;
      case 'M': shift = 20; break;
      case 'G': shift = 30; break;
      case 'T': shift = 40; break;
      default: EW_THROW(ConfigError, "malformed size '", text, "': unknown suffix '", text[pos], "'");
    }
  }
  if (!fractional) {
    EW_REQUIRE(integer <= (std::numeric_limits<uint64_t>::max() >> shift), "size '", text, "' overflows 64 bits");
    return integer << shift;
  }
  // long double holds every uint64_t exactly (64-bit mantissa), so the bound below is exact.
  const long double bytes = std::ceil(std::strtold(number.c_str(), nullptr) * std::ldexp(1.0L, shift));
  EW_REQUIRE(bytes <= static_cast<long double>(std::numeric_limits<uint64_t>::max()), "size '", text,
             "' overflows 64 bits");
  return static_cast<uint64_t>(bytes);
}

uint64_t symmetric_heap_bytes_from_env() {
  const char* text = std::getenv("NVSHMEM_SYMMETRIC_SIZE");
  return (text && *text) ? parse_size_bytes(text) : (1ull << 30);
}

AllToAllConfig make_config(int64_t max_num_tokens, int64_t num_experts, int64_t experts_per_token, int64_t rank,
                           int64_t world_size, int64_t dp_size, int64_t hidden_dim, int64_t hidden_dim_bytes,
                           int64_t hidden_dim_scale_bytes) {
  AllToAllConfig config;
  config.max_num_tokens = max_num_tokens;
  config.num_experts = num_experts;
  config.experts_per_token = experts_per_token;
  config.rank = rank;
  config.world_size = world_size;
  config.dp_size = dp_size;
  config.hidden_dim = hidden_dim;
  config.hidden_dim_bytes = hidden_dim_bytes;
  config.hidden_dim_scale_bytes = hidden_dim_scale_bytes;
  return config;
}

uint64_t default_timeout_ns() {
  const char* text = std::getenv("EXPERTWIRE_TIMEOUT_MS");
  if (!text || !*text) return 10'000'000'000ull;
  uint64_t ms = 0, ns = 0;
  EW_REQUIRE(parse_decimal(text, &ms) && ms > 0 && !__builtin_mul_overflow(ms, 1'000'000ull, &ns),
             "EXPERTWIRE_TIMEOUT_MS must be a positive integer number of milliseconds, got '", text, "'");
  return ns;
}

uint32_t positive_uint32_from_env(const char* name, uint32_t fallback) {
  const char* text = std::getenv(name);
  if (!text || !*text) return fallback;
  uint64_t value = 0;
  EW_REQUIRE(parse_decimal(text, &value) && value > 0 && value <= std::numeric_limits<uint32_t>::max(), name,
             " must be a positive integer below 2^32, got '", text, "'");
  return uint32_t(value);
}

bool nvshmem_p2p_disabled() {
  const char* text = std::getenv("NVSHMEM_DISABLE_P2P");
  if (!text) return false;
  std::string value(text);
  for (char& c : value) c = char(std::tolower(static_cast<unsigned char>(c)));
  return value == "1" || value == "y" || value == "yes" || value == "t" || value == "true" || value == "on";
}

std::string peer_memory_unavailable_reason() {
  if (!nvshmem_p2p_disabled()) return {};
  return "NVSHMEM_DISABLE_P2P is set, so the ranks are taken not to reach each other's memory (as between nodes); "
         "the intranode transport needs peer memory: use the internode transport";
}

void require_peer_memory_allowed(const char* transport) {
  const std::string reason = peer_memory_unavailable_reason();
  EW_REQUIRE(reason.empty(), transport, ": ", reason);
}

}  // namespace expertwire
