// RAII owners of CUDA resources and the check that turns a CUDA status into an exception.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

#include "core/error.h"

#define EW_CUDA_CHECK(expr)                                                                              \
  do {                                                                                                   \
    const cudaError_t ew_status_ = (expr);                                                               \
    if (ew_status_ != cudaSuccess) {                                                                     \
      EW_THROW(RuntimeError, #expr, " failed: ", cudaGetErrorName(ew_status_), " (",                     \
               cudaGetErrorString(ew_status_), ") at ", __FILE__, ":", __LINE__);                        \
    }                                                                                                    \
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
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes == 0) return;
    EW_CUDA_CHECK(cudaMalloc(&data_, bytes));
    EW_CUDA_CHECK(cudaMemset(data_, 0, bytes));
  }
  ~DeviceBuffer() {
    if (data_) cudaFree(data_);
  }
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(bytes_, other.bytes_);
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  template <class T = void>
  T* get() const { return static_cast<T*>(data_); }
  size_t bytes() const { return bytes_; }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// Pinned host memory mapped into the device: kernels write it, the host reads it without a copy.
template <class T>
class MappedHostObject {
 public:
  MappedHostObject() {
    EW_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host_), sizeof(T), cudaHostAllocMapped));
    *host_ = T{};
    EW_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_), host_, 0));
  }
  ~MappedHostObject() {
    if (host_) cudaFreeHost(host_);
  }
  MappedHostObject(const MappedHostObject&) = delete;
  MappedHostObject& operator=(const MappedHostObject&) = delete;

  T* host() const { return host_; }
  T* device() const { return device_; }

 private:
  T* host_ = nullptr;
  T* device_ = nullptr;
};

}  // namespace expertwire
