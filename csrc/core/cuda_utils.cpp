#include "core/cuda_utils.h"

#include <dlfcn.h>

namespace expertwire {
namespace {

// Whether the NVIDIA driver's user-space library can be loaded at all.
bool driver_library_present() {
  void* library = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);
  if (library == nullptr) library = dlopen("libcuda.so.1", RTLD_LAZY);
  if (library == nullptr) return false;
  dlclose(library);
  return true;
}

}  // namespace

std::string cuda_error_cause(cudaError_t status) {
  std::string cause = std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status);
  if (status == cudaErrorInsufficientDriver || status == cudaErrorNoDevice) {
    if (!driver_library_present()) {
      cause =
          "no NVIDIA driver is installed on this machine (libcuda.so.1 cannot be loaded); expertwire needs an "
          "NVIDIA GPU with its driver";
    } else if (status == cudaErrorInsufficientDriver) {
      cause = "the NVIDIA driver is older than this CUDA 13 runtime needs (CUDA reports " + cause +
              "); install driver 580 or newer";
    } else {
      cause = "no CUDA device is visible (CUDA reports " + cause + "; check CUDA_VISIBLE_DEVICES)";
    }
  }
  return cause;
}

std::string cuda_error_message(const char* call, cudaError_t status) {
  return std::string("expertwire: ") + call + " failed: " + cuda_error_cause(status);
}

}  // namespace expertwire
