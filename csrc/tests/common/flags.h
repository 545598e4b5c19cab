// Command-line integers of the benchmarks, checked: a bad value is ConfigError naming the flag and the text.
#pragma once

#include <cstdint>
#include <exception>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"

namespace expertwire::harness {

// A flag's integer of at least `minimum`, or ConfigError naming the flag and the text.
inline int64_t parse_count(const std::string& flag, const std::string& text, int64_t minimum = 1) {
  size_t used = 0;
  int64_t value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  EW_REQUIRE(used == text.size() && used > 0 && value >= minimum, flag, " takes integers >= ", minimum, ", got '", text,
             "'");
  return value;
}

inline std::vector<int64_t> parse_list(const std::string& flag, const std::string& text) {
  std::vector<int64_t> out;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) out.push_back(parse_count(flag, item));
  EW_REQUIRE(!out.empty(), flag, " takes a comma-separated list, got '", text, "'");
  return out;
}

}  // namespace expertwire::harness
