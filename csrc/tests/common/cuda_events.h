// CUDA events for the benchmarks: record on a stream, read the µs between two of them.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <vector>

#include "core/cuda_utils.h"

namespace expertwire::harness {

class Events {
 public:
  explicit Events(size_t count) : events_(count) {
    for (auto& e : events_) EW_CUDA_CHECK(cudaEventCreate(&e));
  }
  ~Events() {
    for (auto& e : events_) cudaEventDestroy(e);
  }
  void record(size_t i, cudaStream_t stream) { EW_CUDA_CHECK(cudaEventRecord(events_[i], stream)); }
  double micros(size_t from, size_t to) const {
    float ms = 0;
    EW_CUDA_CHECK(cudaEventElapsedTime(&ms, events_[from], events_[to]));
    return double(ms) * 1000.0;
  }

 private:
  std::vector<cudaEvent_t> events_;
};

}  // namespace expertwire::harness
