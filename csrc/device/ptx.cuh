// The instructions the kernels need at a scope or cache policy that CUDA C++ does not spell: system-scope
// acquire and release (peers' signals), the global timer (bounded waits), streaming loads and the acq_rel add that
// chains blocks out of a phase.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace expertwire::device {

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  return now;
}

// Signals written by peers (loads/stores over NVLink, or a NIC) are read with acquire at system scope, so the
// data they guard is visible once the signal is.
__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* address) {
  uint64_t value;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(address) : "memory");
  return value;
}

__device__ __forceinline__ void store_release_sys(uint64_t* address, uint64_t value) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(address), "l"(value) : "memory");
}

// A flag between the blocks of one kernel on this GPU.
__device__ __forceinline__ uint32_t load_acquire_gpu(const uint32_t* address) {
  uint32_t value;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(value) : "l"(address) : "memory");
  return value;
}

__device__ __forceinline__ void store_release_gpu(uint32_t* address, uint32_t value) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(address), "r"(value) : "memory");
}

// Adds to a signal at system scope, after this thread's earlier writes (and those they are ordered after).
__device__ __forceinline__ void red_add_release_sys(uint64_t* address, uint64_t value) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(address), "l"(value) : "memory");
}

// Streaming read of data that this kernel reads once: skip L1.
__device__ __forceinline__ int4 load_stream(const int4* address) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(address));
  return v;
}

// Adds 1 to a counter of this GPU with acquire-release ordering and returns the value before: the link that
// chains every block counted out of a phase to the last one.
__device__ __forceinline__ uint32_t count_out_acq_rel(uint32_t* counter) {
  uint32_t before;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(before) : "l"(counter) : "memory");
  return before;
}

}  // namespace expertwire::device
