// Small device primitives shared by every transport and every phase: vector copies, bounded waits,
// system-scope signalling, the error record, warp scans and the "last block out" phase counter.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/layout.h"
#include "device/error_record.h"

namespace expertwire::device {

inline constexpr int kWarpSize = 32;
inline constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ int lane_id() { return threadIdx.x % kWarpSize; }
__device__ __forceinline__ int warp_id() { return threadIdx.x / kWarpSize; }
__device__ __forceinline__ int warps_per_block() { return blockDim.x / kWarpSize; }
__device__ __forceinline__ int global_warp() { return blockIdx.x * warps_per_block() + warp_id(); }
__device__ __forceinline__ int total_warps() { return gridDim.x * warps_per_block(); }

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  return now;
}

// Signals written by peers (loads/stores over NVLink, or a NIC) are read with acquire at system scope,
// so the data they guard is visible once the signal is.
__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* address) {
  uint64_t value;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(address) : "memory");
  return value;
}

__device__ __forceinline__ void store_release_sys(uint64_t* address, uint64_t value) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(address), "l"(value) : "memory");
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

// Where a copy reads from. Inputs of the call are read-only while the kernel runs and may use the
// non-coherent path; buffers that peers write during the kernel must be read coherently.
enum class SourceKind { kInput, kPeerWritten };

template <SourceKind kSource>
__device__ __forceinline__ int4 load_vector(const int4* address) {
  if constexpr (kSource == SourceKind::kInput) {
    return load_stream(address);
  } else {
    return *address;
  }
}

// Vectors in flight per lane in a warp copy of 16-byte vectors (4 KiB a warp per pass): 32 of a thread's 64
// registers (kernel_args.h).
inline constexpr int kCopyUnroll = 8;

// Warp-wide copy of `bytes` (a multiple of sizeof(Word)) from `src` to the destination of every lane set in
// `lanes`, `dst_of(lane)` (called by the whole warp, which may shuffle in it; dst may be a peer's memory). Each
// pass loads up to kUnroll words per lane with `load`, a partial last pass included, before storing any: a pass
// costs one round trip of latency, and a source read once serves every destination. The pass loop is
// warp-uniform, for dst_of's shuffles.
template <class Word, int kUnroll, class LoadWord, class DstOf>
__device__ __forceinline__ void warp_copy_words_to_lanes(const void* src, uint64_t bytes, unsigned lanes,
                                                         LoadWord load, DstOf dst_of) {
  const auto* s = static_cast<const Word*>(src);
  const uint64_t n = bytes / sizeof(Word);
  for (uint64_t pass = 0; pass < n; pass += kUnroll * kWarpSize) {
    const uint64_t base = pass + lane_id();
    Word v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * kWarpSize < n) v[u] = load(s + base + u * kWarpSize);
    }
    for (unsigned left = lanes; left != 0; left &= left - 1) {
      Word* d = reinterpret_cast<Word*>(dst_of(__ffs(left) - 1));
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * kWarpSize < n) d[base + u * kWarpSize] = v[u];
      }
    }
  }
}

// 16-byte vectors, 16-byte aligned rows.
template <SourceKind kSource, class DstOf>
__device__ __forceinline__ void warp_copy_16_to_lanes(const void* src, uint64_t bytes, unsigned lanes,
                                                      DstOf dst_of) {
  warp_copy_words_to_lanes<int4, kCopyUnroll>(
      src, bytes, lanes, [](const int4* word) { return load_vector<kSource>(word); }, dst_of);
}

template <SourceKind kSource>
__device__ __forceinline__ void warp_copy_16(void* dst, const void* src, uint64_t bytes) {
  warp_copy_16_to_lanes<kSource>(src, bytes, 1u, [dst](int) { return dst; });
}

// 4-byte words (fp32 scales) at any byte stride, as a caller's scale tensors may be laid out (padded rows,
// column-major): word i of `words` is read at src + i * src_stride and written at dst_of(lane) + i * dst_stride
// for every lane set in `lanes` (dst_of as in warp_copy_words_to_lanes). 4 words in flight a lane.
template <class DstOf>
__device__ __forceinline__ void warp_copy_4_strided_to_lanes(const uint8_t* src, uint64_t src_stride, uint64_t words,
                                                             unsigned lanes, uint64_t dst_stride, DstOf dst_of) {
  constexpr int kUnroll = 4;
  for (uint64_t pass = 0; pass < words; pass += kUnroll * kWarpSize) {
    const uint64_t base = pass + lane_id();
    uint32_t v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint64_t i = base + u * kWarpSize;
      if (i < words) v[u] = *reinterpret_cast<const uint32_t*>(src + i * src_stride);
    }
    for (unsigned left = lanes; left != 0; left &= left - 1) {
      uint8_t* d = dst_of(__ffs(left) - 1);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const uint64_t i = base + u * kWarpSize;
        if (i < words) *reinterpret_cast<uint32_t*>(d + i * dst_stride) = v[u];
      }
    }
  }
}

// Records the first error of a call; later ones are dropped so the host sees the root cause. The code is
// published after the fields (ErrorRecord): the host, which reads the record while kernels run, never pairs a
// code with another error's or a blank phase.
__device__ __forceinline__ void record_error(ErrorRecord* record, ErrorCode code, Phase phase, int32_t peer,
                                             int64_t value) {
  if (atomicCAS(&record->claimed, 0, 1) == 0) {
    record->phase = phase;
    record->peer = peer;
    record->value = value;
    __threadfence_system();
    *reinterpret_cast<volatile int32_t*>(&record->code) = int32_t(code);
    __threadfence_system();
  }
}

// Whether a wait of this rank has already given up on a peer. Bad input recorded by this rank does not
// count: peers are alive and still signal, and giving up on them would leave this rank's blocks with
// different views of what arrived.
__device__ __forceinline__ bool wait_failed(const ErrorRecord* record) {
  return *reinterpret_cast<const volatile int32_t*>(&record->code) == int32_t(ErrorCode::kTimeout);
}

// Waits until `arrived(*signal)` holds for a value peers write, and returns that value. Never spins forever:
// after `timeout_ns`, or as soon as another wait of this rank has timed out, it records the error and returns 0.
template <class Arrived>
__device__ __forceinline__ uint64_t wait_signal_until(const uint64_t* signal, Arrived arrived, uint64_t timeout_ns,
                                                      ErrorRecord* record, Phase phase, int32_t peer) {
  uint64_t value = load_acquire_sys(signal);
  if (arrived(value)) return value;
  const uint64_t start = global_timer_ns();
  for (uint32_t spin = 1;; ++spin) {
    value = load_acquire_sys(signal);
    if (arrived(value)) return value;
    // The error record lives in host memory: look at it rarely, the clock often.
    if ((spin & 1023) == 0 && wait_failed(record)) return 0;
    if (global_timer_ns() - start > timeout_ns) {
      record_error(record, ErrorCode::kTimeout, phase, peer, int64_t(timeout_ns / 1000000));
      return 0;
    }
  }
}

// Waits until a peer sets `*signal` to a non-zero value and returns it (0 on timeout, see above).
__device__ __forceinline__ uint64_t wait_signal(const uint64_t* signal, uint64_t timeout_ns, ErrorRecord* record,
                                                Phase phase, int32_t peer) {
  return wait_signal_until(signal, [](uint64_t value) { return value != 0; }, timeout_ns, record, phase, peer);
}

// Waits until every block of a peer has added its share to an ArrivalSignal; returns it (0 on timeout).
__device__ __forceinline__ uint64_t wait_arrivals(const uint64_t* signal, uint64_t timeout_ns, ErrorRecord* record,
                                                  Phase phase, int32_t peer) {
  return wait_signal_until(signal, [](uint64_t value) { return ArrivalSignal::complete(value); }, timeout_ns, record,
                           phase, peer);
}

// Exclusive prefix sum of `values[0..n)` into `out[0..n]` (out[n] = total), computed by one warp.
__device__ __forceinline__ void warp_exclusive_scan(const uint32_t* values, uint32_t* out, uint32_t n) {
  uint32_t carry = 0;
  for (uint32_t base = 0; base < n; base += kWarpSize) {
    const uint32_t i = base + lane_id();
    const uint32_t own = i < n ? values[i] : 0;
    uint32_t inclusive = own;
#pragma unroll
    for (int offset = 1; offset < kWarpSize; offset *= 2) {
      const uint32_t other = __shfl_up_sync(kFullMask, inclusive, offset);
      if (lane_id() >= offset) inclusive += other;
    }
    if (i < n) out[i] = carry + inclusive - own;
    carry += __shfl_sync(kFullMask, inclusive, kWarpSize - 1);
  }
  if (lane_id() == 0) out[n] = carry;
}

// Index i with prefix[i] <= value < prefix[i + 1], for a non-decreasing prefix of n + 1 entries.
__device__ __forceinline__ uint32_t find_segment(const uint32_t* prefix, uint32_t n, uint32_t value) {
  uint32_t lo = 0, hi = n;
  while (hi - lo > 1) {
    const uint32_t mid = (lo + hi) / 2;
    if (prefix[mid] <= value) lo = mid; else hi = mid;
  }
  return lo;
}

// Adds 1 to a counter of this GPU with acquire-release ordering and returns the value before: the link that
// chains every block counted out of a phase to the last one.
__device__ __forceinline__ uint32_t count_out_acq_rel(uint32_t* counter) {
  uint32_t before;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(before) : "l"(counter) : "memory");
  return before;
}

// Counts blocks out of a phase. Returns true in exactly one block, the last to finish; everything any block
// wrote before its call happens before what that block does next, so it may signal peers or reset shared
// state (and must reset the counter itself). Call with the whole block.
// Ordering without a system fence (fence.sc.sys costs several µs per call on H100): each block's barrier
// puts its threads' writes before thread 0's acq_rel add, the adds chain every block to the last one, and a
// later st.release.sys of that block carries all of it to peers (release is cumulative).
__device__ __forceinline__ bool last_block_out(uint32_t* counter) {
  __shared__ bool is_last;
  __syncthreads();
  if (threadIdx.x == 0) is_last = count_out_acq_rel(counter) == gridDim.x - 1;
  __syncthreads();
  return is_last;
}

// The token count of this call: *bound_m when given, never more than m (checked, not trusted).
__device__ __forceinline__ uint32_t read_bound_m(const uint32_t* bound_m, uint32_t m, ErrorRecord* record,
                                                 Phase phase) {
  if (bound_m == nullptr) return m;
  const uint32_t value = *bound_m;
  if (value > m) {
    record_error(record, ErrorCode::kBadBoundM, phase, -1, value);
    return 0;
  }
  return value;
}

}  // namespace expertwire::device
