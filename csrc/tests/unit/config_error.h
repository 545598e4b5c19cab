// The unit tests' way to assert a ConfigError: run the action, require exactly that exception, return its message.
#pragma once

#include <gtest/gtest.h>

#include <exception>
#include <functional>
#include <string>

#include "core/error.h"

namespace expertwire {

inline std::string config_error_message(const std::function<void()>& action) {
  try {
    action();
  } catch (const ConfigError& error) {
    return error.what();
  } catch (const std::exception& error) {
    ADD_FAILURE() << "expected expertwire::ConfigError, got another exception: " << error.what();
    return {};
  }
  ADD_FAILURE() << "expected expertwire::ConfigError, nothing was thrown";
  return {};
}

}  // namespace expertwire
