// The exceptions expertwire throws. Every failure surfaces as one of them, with a message that names the
// failing value, so a misconfigured serving process stops with a sentence instead of a device assert or a hang.
#pragma once

#include <stdexcept>

namespace expertwire {

// Base of every error thrown by expertwire.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A configuration or argument value is invalid; the message names the field or argument and the value.
// Raised before anything is launched: the object stays usable.
class ConfigError : public Error {
 public:
  using Error::Error;
};

// A CUDA, NVSHMEM or system call failed (no driver, out of memory, a peer that never sent its buffer).
class RuntimeError : public Error {
 public:
  using Error::Error;
};

// A device-side wait ran out of time, or a kernel found bad input; raised on the host from the kernels' error
// record. Sticky: the object refuses every later call with the same error.
class DeviceError : public Error {
 public:
  using Error::Error;
};

}  // namespace expertwire
