// Throwing the exceptions of expertwire/error.h with a message built from parts.
#pragma once

#include <sstream>
#include <string>
#include <utility>

#include "expertwire/error.h"

namespace expertwire::detail {
template <class... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream out;
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}
}  // namespace expertwire::detail

#define EW_THROW(Type, ...) throw ::expertwire::Type(::expertwire::detail::concat(__VA_ARGS__))

#define EW_REQUIRE(cond, ...)                        \
  do {                                               \
    if (!(cond)) EW_THROW(ConfigError, __VA_ARGS__); \
  } while (0)
