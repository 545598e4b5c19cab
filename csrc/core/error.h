// Host-side error types. Every failure surfaces as an exception whose message names the failing value,
// so a misconfigured serving process dies with a sentence instead of a device assert or a hang.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace expertwire {

// Base of every error thrown by expertwire.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A configuration or argument value is invalid; the message names the field and the value.
class ConfigError : public Error {
 public:
  using Error::Error;
};

// A CUDA or NVSHMEM call failed.
class RuntimeError : public Error {
 public:
  using Error::Error;
};

// A device-side wait ran out of time, or the device detected bad input; raised on the host.
class DeviceError : public Error {
 public:
  using Error::Error;
};

namespace detail {
template <class... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream out;
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}
}  // namespace detail

}  // namespace expertwire

#define EW_THROW(Type, ...) throw ::expertwire::Type(::expertwire::detail::concat(__VA_ARGS__))

#define EW_REQUIRE(cond, ...)                                \
  do {                                                       \
    if (!(cond)) EW_THROW(ConfigError, __VA_ARGS__);         \
  } while (0)
