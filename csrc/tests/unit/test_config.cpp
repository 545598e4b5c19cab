// AllToAllConfig::validate(), parse_size_bytes(), default_timeout_ns() and positive_uint32_from_env().
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <functional>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "core/env.h"
#include "core/error.h"
#include "expertwire/config.h"
#include "tests/unit/config_error.h"

namespace expertwire {
namespace {

using ::testing::HasSubstr;

// The DeepSeek-V3 shape (fp8 payload, one fp32 scale per 128 elements: 7168 / 128 * 4 = 224 bytes).
AllToAllConfig deepseek_v3_config() {
  AllToAllConfig config;
  config.max_num_tokens = 128;
  config.num_experts = 256;
  config.experts_per_token = 8;
  config.rank = 0;
  config.world_size = 8;
  config.dp_size = 1;
  config.hidden_dim = 7168;
  config.hidden_dim_bytes = 7168;
  config.hidden_dim_scale_bytes = 224;
  return config;
}

TEST(ConfigValidate, DeepSeekV3ConfigPasses) {
  const AllToAllConfig config = deepseek_v3_config();
  EXPECT_NO_THROW(config.validate());
  EXPECT_EQ(config.num_local_experts(), 32);  // 256 / 8
  EXPECT_EQ(config.num_dp_groups(), 8);       // 8 / 1
  EXPECT_EQ(config.max_recv_tokens(), 1024);  // 128 * 8
}

TEST(ConfigValidate, LastRankAndNoScalesPass) {
  AllToAllConfig config = deepseek_v3_config();
  config.rank = 7;
  config.hidden_dim_scale_bytes = 0;
  EXPECT_NO_THROW(config.validate());
}

TEST(ConfigValidate, DataParallelAccessors) {
  AllToAllConfig config = deepseek_v3_config();
  config.dp_size = 4;
  config.rank = 6;
  EXPECT_NO_THROW(config.validate());
  EXPECT_EQ(config.num_dp_groups(), 2);      // 8 / 4
  EXPECT_EQ(config.dp_group(), 1);           // 6 / 4
  EXPECT_EQ(config.dp_rank(), 2);            // 6 % 4
  EXPECT_EQ(config.max_recv_tokens(), 256);  // 128 * 2
}

struct BadConfigCase {
  std::string name;
  std::function<void(AllToAllConfig&)> mutate;
  std::vector<std::string> message_parts;  // the field and the bad value, as the message spells them
};

void PrintTo(const BadConfigCase& bad_case, std::ostream* os) { *os << bad_case.name; }

class ConfigValidateRejects : public ::testing::TestWithParam<BadConfigCase> {};

TEST_P(ConfigValidateRejects, ThrowsConfigErrorNamingFieldAndValue) {
  AllToAllConfig config = deepseek_v3_config();
  GetParam().mutate(config);
  const std::string message = config_error_message([&] { config.validate(); });
  for (const std::string& part : GetParam().message_parts) EXPECT_THAT(message, HasSubstr(part));
}

// A field set to a bad value; the message must name the field and repeat the value after "got ".
#define BAD_FIELD_CASE(test_name, field, value)                                                                \
  BadConfigCase {                                                                                              \
    test_name, [](AllToAllConfig& c) { c.field = value; }, { "AllToAllConfig." #field " must", "got " #value } \
  }

INSTANTIATE_TEST_SUITE_P(
    NonPositiveFields, ConfigValidateRejects,
    ::testing::Values(BAD_FIELD_CASE("max_num_tokens_zero", max_num_tokens, 0),
                      BAD_FIELD_CASE("max_num_tokens_negative", max_num_tokens, -5),
                      BAD_FIELD_CASE("num_experts_zero", num_experts, 0),
                      BAD_FIELD_CASE("num_experts_negative", num_experts, -256),
                      BAD_FIELD_CASE("experts_per_token_zero", experts_per_token, 0),
                      BAD_FIELD_CASE("experts_per_token_negative", experts_per_token, -1),
                      BAD_FIELD_CASE("world_size_zero", world_size, 0),
                      BAD_FIELD_CASE("world_size_negative", world_size, -8), BAD_FIELD_CASE("dp_size_zero", dp_size, 0),
                      BAD_FIELD_CASE("dp_size_negative", dp_size, -2), BAD_FIELD_CASE("hidden_dim_zero", hidden_dim, 0),
                      BAD_FIELD_CASE("hidden_dim_negative", hidden_dim, -7168),
                      BAD_FIELD_CASE("hidden_dim_bytes_zero", hidden_dim_bytes, 0),
                      BAD_FIELD_CASE("hidden_dim_bytes_negative", hidden_dim_bytes, -16),
                      BAD_FIELD_CASE("hidden_dim_scale_bytes_negative", hidden_dim_scale_bytes, -4)),
    [](const ::testing::TestParamInfo<BadConfigCase>& info) { return info.param.name; });

INSTANTIATE_TEST_SUITE_P(
    Relations, ConfigValidateRejects,
    ::testing::Values(
        BadConfigCase{
            "rank_negative", [](AllToAllConfig& c) { c.rank = -1; }, {"AllToAllConfig.rank", "world_size=8", "got -1"}},
        BadConfigCase{"rank_equals_world_size",
                      [](AllToAllConfig& c) { c.rank = 8; },
                      {"AllToAllConfig.rank", "world_size=8", "got 8"}},
        BadConfigCase{
            "rank_above_world_size", [](AllToAllConfig& c) { c.rank = 100; }, {"AllToAllConfig.rank", "got 100"}},
        // 250 / 8 = 31.25
        BadConfigCase{"num_experts_not_divisible_by_world_size",
                      [](AllToAllConfig& c) { c.num_experts = 250; },
                      {"AllToAllConfig.num_experts", "divisible by world_size=8", "got 250"}},
        // 8 / 3 = 2.67
        BadConfigCase{"world_size_not_divisible_by_dp_size",
                      [](AllToAllConfig& c) { c.dp_size = 3; },
                      {"AllToAllConfig.world_size", "dp_size=3", "got 8"}},
        // dp_size larger than world_size: 8 % 16 = 8 != 0
        BadConfigCase{"dp_size_above_world_size",
                      [](AllToAllConfig& c) { c.dp_size = 16; },
                      {"AllToAllConfig.world_size", "dp_size=16", "got 8"}},
        BadConfigCase{"experts_per_token_above_num_experts",
                      [](AllToAllConfig& c) {
                        c.num_experts = 8;
                        c.experts_per_token = 9;
                      },
                      {"AllToAllConfig.experts_per_token", "num_experts=8", "got 9"}},
        // 7160 = 447 * 16 + 8
        BadConfigCase{"hidden_dim_bytes_not_multiple_of_16",
                      [](AllToAllConfig& c) { c.hidden_dim_bytes = 7160; },
                      {"AllToAllConfig.hidden_dim_bytes must", "multiple of 16", "got 7160"}},
        // 8 is a multiple of 8 but not of 16
        BadConfigCase{"hidden_dim_bytes_8",
                      [](AllToAllConfig& c) { c.hidden_dim_bytes = 8; },
                      {"AllToAllConfig.hidden_dim_bytes must", "multiple of 16", "got 8"}},
        // 222 = 55 * 4 + 2
        BadConfigCase{"scale_bytes_not_multiple_of_4",
                      [](AllToAllConfig& c) { c.hidden_dim_scale_bytes = 222; },
                      {"AllToAllConfig.hidden_dim_scale_bytes", "multiple of 4", "got 222"}},
        // 7164 = 895 * 8 + 4
        BadConfigCase{"hidden_dim_not_multiple_of_8",
                      [](AllToAllConfig& c) { c.hidden_dim = 7164; },
                      {"AllToAllConfig.hidden_dim must", "multiple of 8", "got 7164"}},
        // 2^31 exceeds UINT32_MAX / 2 = 2147483647
        BadConfigCase{"hidden_dim_too_large_for_u32",
                      [](AllToAllConfig& c) { c.hidden_dim = 2147483648; },
                      {"AllToAllConfig.hidden_dim is too large", "32-bit", "got 2147483648"}},
        BadConfigCase{"max_num_tokens_too_large_for_u32",
                      [](AllToAllConfig& c) { c.max_num_tokens = 4294967296; },
                      {"AllToAllConfig.max_num_tokens is too large", "32-bit", "got 4294967296"}},
        // m + 1 travels in a 24-bit field of the pull dispatch's arrival signal.
        BadConfigCase{"max_num_tokens_past_arrival_payload",
                      [](AllToAllConfig& c) { c.max_num_tokens = 16777215; },
                      {"AllToAllConfig.max_num_tokens must be < 16777215", "got 16777215"}},
        // Each field fits on its own, but the rows per local expert do not: (2^31 - 1) * (8 / 1) = 17,179,869,176
        BadConfigCase{"max_recv_tokens_too_large_for_u32",
                      [](AllToAllConfig& c) {
                        c.max_num_tokens = 2147483647;
                        c.num_experts = 8;
                      },
                      {"max_num_tokens * world_size / dp_size", "32-bit", "got 17179869176"}},
        // Each fits, but not the combine's work items: 16,777,214 tokens * (65536 / 256 = 256 chunks)
        BadConfigCase{"combine_chunks_too_large_for_u32",
                      [](AllToAllConfig& c) {
                        c.max_num_tokens = 16777214;
                        c.hidden_dim = 65536;
                      },
                      {"max_num_tokens * ceil(hidden_dim / 256)", "32-bit", "got 4294966784"}},
        // Just past the limit: 2^28 * 8 = 2^31 > UINT32_MAX / 2 = 2147483647
        BadConfigCase{"max_recv_tokens_one_past_limit",
                      [](AllToAllConfig& c) { c.max_num_tokens = 268435456; },
                      {"max_num_tokens * world_size / dp_size", "got 2147483648"}},
        // With data parallelism only the DP groups count: 2^30 * (8 / 4) = 2^31
        BadConfigCase{"max_recv_tokens_with_dp_groups",
                      [](AllToAllConfig& c) {
                        c.dp_size = 4;
                        c.max_num_tokens = 1073741824;
                      },
                      {"max_num_tokens * world_size / dp_size", "got 2147483648"}}),
    [](const ::testing::TestParamInfo<BadConfigCase>& info) { return info.param.name; });

TEST(ConfigValidate, MaxRecvTokensAtLimitPasses) {
  AllToAllConfig config = deepseek_v3_config();
  // The largest max_num_tokens (2^24 - 2) on 128 ranks: 16,777,214 * 128 = 2,147,483,392 <= 2,147,483,647.
  config.world_size = 128;
  config.max_num_tokens = 16777214;
  EXPECT_NO_THROW(config.validate());
  EXPECT_EQ(config.max_recv_tokens(), 2147483392);
  // One more rank per group would pass the 32-bit limit; one DP group of 128 ranks keeps it at max_num_tokens.
  config.dp_size = 128;
  EXPECT_NO_THROW(config.validate());
  EXPECT_EQ(config.max_recv_tokens(), 16777214);
}

TEST(ConfigValidate, FirstInvalidFieldIsReported) {
  AllToAllConfig config = deepseek_v3_config();
  config.num_experts = 0;
  config.hidden_dim = 0;
  const std::string message = config_error_message([&] { config.validate(); });
  EXPECT_THAT(message, HasSubstr("num_experts"));
  EXPECT_THAT(message, ::testing::Not(HasSubstr("hidden_dim")));
}

TEST(ParseSizeBytes, Suffixes) {
  EXPECT_EQ(parse_size_bytes("2G"), 2147483648ull);     // 2 * 2^30
  EXPECT_EQ(parse_size_bytes("1024M"), 1073741824ull);  // 1024 * 2^20
  EXPECT_EQ(parse_size_bytes("512k"), 524288ull);       // 512 * 2^10, lower case accepted
  EXPECT_EQ(parse_size_bytes("512K"), 524288ull);
  EXPECT_EQ(parse_size_bytes("1T"), 1099511627776ull);  // 2^40
  EXPECT_EQ(parse_size_bytes("3m"), 3145728ull);        // 3 * 2^20
}

TEST(ParseSizeBytes, PlainNumber) {
  EXPECT_EQ(parse_size_bytes("123"), 123ull);
  EXPECT_EQ(parse_size_bytes("0"), 0ull);
  EXPECT_EQ(parse_size_bytes("18446744073709551615"), 18446744073709551615ull);  // UINT64_MAX
}

TEST(ParseSizeBytes, PlainNumberPastSixtyFourBits) {
  // 30 digits, no suffix: must not saturate to UINT64_MAX.
  const std::string message = config_error_message([] { parse_size_bytes("123456789012345678901234567890"); });
  EXPECT_THAT(message, HasSubstr("malformed size '123456789012345678901234567890'"));
  EXPECT_THAT(message, HasSubstr("64 bits"));
}

TEST(ParseSizeBytes, PlainNumberOnePastUint64Max) {
  // UINT64_MAX + 1 = 2^64
  const std::string message = config_error_message([] { parse_size_bytes("18446744073709551616"); });
  EXPECT_THAT(message, HasSubstr("malformed size '18446744073709551616'"));
}

TEST(ParseSizeBytes, DigitsPastSixtyFourBitsWithSuffix) {
  // The digits themselves overflow before the suffix shift is applied.
  const std::string message = config_error_message([] { parse_size_bytes("99999999999999999999K"); });
  EXPECT_THAT(message, HasSubstr("'99999999999999999999K'"));
}

TEST(ParseSizeBytes, MalformedLetters) {
  const std::string message = config_error_message([] { parse_size_bytes("abc"); });
  EXPECT_THAT(message, HasSubstr("malformed size 'abc'"));
}

TEST(ParseSizeBytes, UnknownSuffix) {
  const std::string message = config_error_message([] { parse_size_bytes("12X"); });
  EXPECT_THAT(message, HasSubstr("'12X'"));
  EXPECT_THAT(message, HasSubstr("unknown suffix 'X'"));
}

TEST(ParseSizeBytes, Empty) {
  const std::string message = config_error_message([] { parse_size_bytes(""); });
  EXPECT_THAT(message, HasSubstr("malformed size ''"));
}

TEST(ParseSizeBytes, CharactersAfterTheSuffixAreIgnoredAsNvshmemDoes) {
  EXPECT_EQ(parse_size_bytes("1GB"), 1073741824ull);
  EXPECT_EQ(parse_size_bytes("20kk"), 20480ull);  // one multiplier only: not 20m
}

TEST(ParseSizeBytes, DecimalsRoundUpAsNvshmemDocuments) {
  EXPECT_EQ(parse_size_bytes("3.1M"), 3250586ull);  // ceil(3.1 * 2^20) = ceil(3250585.6)
  EXPECT_EQ(parse_size_bytes(".5m"), 524288ull);
  EXPECT_EQ(parse_size_bytes("0.5m"), 524288ull);
  EXPECT_EQ(parse_size_bytes("1.5G"), 1610612736ull);
  EXPECT_EQ(parse_size_bytes("2e9"), 2000000000ull);
  EXPECT_EQ(parse_size_bytes("1.e3"), 1000ull);
  EXPECT_EQ(parse_size_bytes(" 2G"), 2147483648ull);  // leading blanks, as sscanf skips them
}

TEST(ParseSizeBytes, MalformedNumbers) {
  for (const char* text : {".", "-1", "+1", "e5", "1e", "--2G"}) {
    const std::string message = config_error_message([&] { parse_size_bytes(text); });
    EXPECT_THAT(message, HasSubstr(std::string("'") + text + "'")) << text;
  }
  EXPECT_THAT(config_error_message([] { parse_size_bytes("1e"); }), HasSubstr("unknown suffix 'e'"));
}

TEST(ParseSizeBytes, DecimalOverflow) {
  EXPECT_THAT(config_error_message([] { parse_size_bytes("16777216.5T"); }), HasSubstr("overflows 64 bits"));
  EXPECT_THAT(config_error_message([] { parse_size_bytes("1e30"); }), HasSubstr("overflows 64 bits"));
}

TEST(ParseSizeBytes, SuffixWithoutDigits) {
  const std::string message = config_error_message([] { parse_size_bytes("G"); });
  EXPECT_THAT(message, HasSubstr("malformed size 'G'"));
}

TEST(ParseSizeBytes, Overflow) {
  // 2^24 T = 2^64
  const std::string message = config_error_message([] { parse_size_bytes("16777216T"); });
  EXPECT_THAT(message, HasSubstr("'16777216T' overflows 64 bits"));
  EXPECT_EQ(parse_size_bytes("16777215T"), 18446742974197923840ull);  // (2^24 - 1) * 2^40 = 2^64 - 2^40
}

// Sets (or unsets) an environment variable for one test and restores the previous value afterwards.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, std::optional<std::string> value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = std::string(old);
    apply(value);
  }
  ~ScopedEnv() { apply(old_); }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  void apply(const std::optional<std::string>& value) {
    if (value) {
      setenv(name_, value->c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }
  const char* name_;
  std::optional<std::string> old_;
};

TEST(PeerMemory, AllowedUnlessNvshmemP2pIsDisabled) {
  {
    ScopedEnv env("NVSHMEM_DISABLE_P2P", std::nullopt);
    EXPECT_NO_THROW(require_peer_memory_allowed("intranode"));
  }
  {
    ScopedEnv env("NVSHMEM_DISABLE_P2P", std::string("0"));
    EXPECT_NO_THROW(require_peer_memory_allowed("intranode"));
  }
  for (const char* set : {"1", "true", "Y"}) {
    ScopedEnv env("NVSHMEM_DISABLE_P2P", std::string(set));
    try {
      require_peer_memory_allowed("intranode");
      ADD_FAILURE() << "NVSHMEM_DISABLE_P2P=" << set << " did not refuse the intranode transport";
    } catch (const ConfigError& e) {
      EXPECT_THAT(e.what(), testing::HasSubstr("intranode: NVSHMEM_DISABLE_P2P is set"));
    }
  }
}

TEST(DefaultTimeout, UnsetIsTenSeconds) {
  ScopedEnv env("EXPERTWIRE_TIMEOUT_MS", std::nullopt);
  EXPECT_EQ(default_timeout_ns(), 10000000000ull);  // 10 s = 10^10 ns
}

TEST(DefaultTimeout, EmptyIsTenSeconds) {
  ScopedEnv env("EXPERTWIRE_TIMEOUT_MS", std::string());
  EXPECT_EQ(default_timeout_ns(), 10000000000ull);
}

TEST(DefaultTimeout, SetInMilliseconds) {
  ScopedEnv env("EXPERTWIRE_TIMEOUT_MS", std::string("250"));
  EXPECT_EQ(default_timeout_ns(), 250000000ull);  // 250 ms = 250 * 10^6 ns
}

TEST(DefaultTimeout, OneMillisecond) {
  ScopedEnv env("EXPERTWIRE_TIMEOUT_MS", std::string("1"));
  EXPECT_EQ(default_timeout_ns(), 1000000ull);
}

TEST(DefaultTimeout, RejectsLetters) {
  ScopedEnv env("EXPERTWIRE_TIMEOUT_MS", std::string("abc"));
  const std::string message = config_error_message([] { default_timeout_ns(); });
  EXPECT_THAT(message, HasSubstr("EXPERTWIRE_TIMEOUT_MS"));
  EXPECT_THAT(message, HasSubstr("'abc'"));
}

TEST(DefaultTimeout, RejectsTrailingUnit) {
  ScopedEnv env("EXPERTWIRE_TIMEOUT_MS", std::string("12ms"));
  const std::string message = config_error_message([] { default_timeout_ns(); });
  EXPECT_THAT(message, HasSubstr("EXPERTWIRE_TIMEOUT_MS"));
  EXPECT_THAT(message, HasSubstr("'12ms'"));
}

TEST(DefaultTimeout, RejectsZero) {
  ScopedEnv env("EXPERTWIRE_TIMEOUT_MS", std::string("0"));
  const std::string message = config_error_message([] { default_timeout_ns(); });
  EXPECT_THAT(message, HasSubstr("positive integer"));
  EXPECT_THAT(message, HasSubstr("'0'"));
}

TEST(DefaultTimeout, FifteenHundredMilliseconds) {
  ScopedEnv env("EXPERTWIRE_TIMEOUT_MS", std::string("1500"));
  EXPECT_EQ(default_timeout_ns(), 1500000000ull);  // 1500 * 10^6 ns = 1.5 s
}

TEST(DefaultTimeout, LargestValueThatFits) {
  // floor((2^64 - 1) / 10^6) = 18,446,744,073,709 ms; * 10^6 = 18,446,744,073,709,000,000 ns <= UINT64_MAX
  ScopedEnv env("EXPERTWIRE_TIMEOUT_MS", std::string("18446744073709"));
  EXPECT_EQ(default_timeout_ns(), 18446744073709000000ull);
}

struct BadTimeoutCase {
  std::string name;
  std::string value;
};

void PrintTo(const BadTimeoutCase& bad_case, std::ostream* os) { *os << bad_case.name; }

class DefaultTimeoutRejects : public ::testing::TestWithParam<BadTimeoutCase> {};

TEST_P(DefaultTimeoutRejects, ThrowsConfigErrorNamingVariableAndValue) {
  ScopedEnv env("EXPERTWIRE_TIMEOUT_MS", GetParam().value);
  const std::string message = config_error_message([] { default_timeout_ns(); });
  EXPECT_THAT(message, HasSubstr("EXPERTWIRE_TIMEOUT_MS"));
  EXPECT_THAT(message, HasSubstr("positive integer"));
  EXPECT_THAT(message, HasSubstr("'" + GetParam().value + "'"));
}

INSTANTIATE_TEST_SUITE_P(
    SignsSpacesAndOverflow, DefaultTimeoutRejects,
    ::testing::Values(BadTimeoutCase{"minus_five", "-5"},  // strtoull wraps it to 2^64 - 5
                      BadTimeoutCase{"plus_five", "+5"}, BadTimeoutCase{"leading_space", " 5"},
                      BadTimeoutCase{"trailing_space", "5 "}, BadTimeoutCase{"minus_zero", "-0"},
                      // 2 * 10^13 ms * 10^6 = 2 * 10^19 ns > UINT64_MAX (~1.8447 * 10^19)
                      BadTimeoutCase{"ns_overflow", "20000000000000"},
                      // 18,446,744,073,710 ms * 10^6 = 18,446,744,073,710,000,000 > 18,446,744,073,709,551,615
                      BadTimeoutCase{"ns_overflow_by_one_ms", "18446744073710"},
                      // the milliseconds themselves past 64 bits (strtoull saturates)
                      BadTimeoutCase{"ms_past_64_bits", "99999999999999999999999"}),
    [](const ::testing::TestParamInfo<BadTimeoutCase>& info) { return info.param.name; });

TEST(SymmetricHeapFromEnv, DefaultAndSet) {
  {
    ScopedEnv env("NVSHMEM_SYMMETRIC_SIZE", std::nullopt);
    EXPECT_EQ(symmetric_heap_bytes_from_env(), 1073741824ull);  // 1 GiB default
  }
  {
    ScopedEnv env("NVSHMEM_SYMMETRIC_SIZE", std::string("4G"));
    EXPECT_EQ(symmetric_heap_bytes_from_env(), 4294967296ull);  // 4 * 2^30
  }
  {
    ScopedEnv env("NVSHMEM_SYMMETRIC_SIZE", std::string("4Q"));
    const std::string message = config_error_message([] { symmetric_heap_bytes_from_env(); });
    EXPECT_THAT(message, HasSubstr("'4Q'"));
  }
}

TEST(PositiveUint32FromEnv, UnsetOrEmptyIsTheFallback) {
  {
    ScopedEnv env("EXPERTWIRE_TEST_COUNT", std::nullopt);
    EXPECT_EQ(positive_uint32_from_env("EXPERTWIRE_TEST_COUNT", 7), 7u);
  }
  ScopedEnv env("EXPERTWIRE_TEST_COUNT", std::string());
  EXPECT_EQ(positive_uint32_from_env("EXPERTWIRE_TEST_COUNT", 7), 7u);
}

TEST(PositiveUint32FromEnv, ReadsDigits) {
  ScopedEnv env("EXPERTWIRE_TEST_COUNT", std::string("4294967295"));  // 2^32 - 1
  EXPECT_EQ(positive_uint32_from_env("EXPERTWIRE_TEST_COUNT", 7), 4294967295u);
}

TEST(PositiveUint32FromEnv, RejectsWhatWouldWrapOrIsNotAPositiveInteger) {
  // 2^32 and 2^32 + 512 wrapped to 0 and 512 blocks or threads before; "-1" to 2^32 - 1.
  for (const char* text : {"4294967296", "4294967808", "-1", "0", "+5", " 5", "5 ", "0x10", "12ms"}) {
    ScopedEnv env("EXPERTWIRE_TEST_COUNT", std::string(text));
    const std::string message = config_error_message([] { positive_uint32_from_env("EXPERTWIRE_TEST_COUNT", 7); });
    EXPECT_THAT(message, HasSubstr("EXPERTWIRE_TEST_COUNT must be a positive integer below 2^32")) << text;
    EXPECT_THAT(message, HasSubstr(std::string("'") + text + "'")) << text;
  }
}

}  // namespace
}  // namespace expertwire
