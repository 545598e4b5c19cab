// RAII owners of CUDA resources, and the check that turns a CUDA status into an exception.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <memory>
#include <string>
#include <utility>

#include "core/error.h"

namespace expertwire {

// Why a CUDA call failed, in words a user can act on: a missing driver is named as such, not as CUDA's
// "insufficient driver".
std::string cuda_error_cause(cudaError_t status);
// One sentence for a failed CUDA call: what failed and why.
std::string cuda_error_message(const char* call, cudaError_t status);

}  // namespace expertwire

#define EW_CUDA_CHECK(expr)                                                                  \
  do {                                                                                       \
    const cudaError_t ew_status_ = (expr);                                                   \
    if (ew_status_ != cudaSuccess)                                                           \
      throw ::expertwire::RuntimeError(::expertwire::cuda_error_message(#expr, ew_status_)); \
  } while (0)

namespace expertwire {

// The calling thread's current CUDA device.
inline int current_device() {
  int device = 0;
  EW_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

// Makes `device` current while it lives and then restores the caller's: a call launches on the GPU that owns
// its buffers, whichever device the caller has made current.
class ScopedDevice {
 public:
  explicit ScopedDevice(int device) : previous_(current_device()) {
    if (previous_ != device) {
      EW_CUDA_CHECK(cudaSetDevice(device));
      switched_ = true;
    }
  }
  ~ScopedDevice() {
    if (switched_) cudaSetDevice(previous_);
  }
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;

 private:
  int previous_;
  bool switched_ = false;
};

// Device memory from cudaMalloc, zeroed on allocation.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) {
    if (bytes == 0) return;
    void* data = nullptr;
    EW_CUDA_CHECK(cudaMalloc(&data, bytes));
    // Owned by a local until the memset succeeds: a constructor that throws runs no destructor.
    std::unique_ptr<void, FreeDevice> owned(data);
    EW_CUDA_CHECK(cudaMemset(data, 0, bytes));
    data_ = std::move(owned);
    bytes_ = bytes;
  }
  DeviceBuffer(DeviceBuffer&& other) noexcept : data_(std::move(other.data_)), bytes_(std::exchange(other.bytes_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    data_ = std::move(other.data_);
    bytes_ = std::exchange(other.bytes_, 0);
    return *this;
  }

  template <class T = void>
  T* get() const {
    return static_cast<T*>(data_.get());
  }
  size_t bytes() const { return bytes_; }

 private:
  struct FreeDevice {
    void operator()(void* data) const { cudaFree(data); }
  };
  std::unique_ptr<void, FreeDevice> data_;
  size_t bytes_ = 0;
};

// Pinned host memory mapped into the device, `count` value-initialized Ts: kernels write it, the host reads it
// without a copy.
template <class T>
class MappedHostArray {
 public:
  explicit MappedHostArray(size_t count) {
    T* host = nullptr;
    EW_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host), count * sizeof(T), cudaHostAllocMapped));
    host_.reset(host);  // owned from here on, whatever throws next
    for (size_t i = 0; i < count; ++i) host_.get()[i] = T{};
    EW_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_), host_.get(), 0));
  }

  T* host() const { return host_.get(); }
  T* device() const { return device_; }

 private:
  struct FreeHost {
    void operator()(T* host) const { cudaFreeHost(host); }
  };
  std::unique_ptr<T, FreeHost> host_;
  T* device_ = nullptr;
};

// One mapped T.
template <class T>
class MappedHostObject : public MappedHostArray<T> {
 public:
  MappedHostObject() : MappedHostArray<T>(1) {}
};

}  // namespace expertwire
