// The primitives every phase is written over: warp geometry, the one warp copy loop, the error record, the one
// bounded wait, warp scans and the "last block out" phase counter.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/layout.h"
#include "device/error_record.h"
#include "device/ptx.cuh"

namespace expertwire::device {

inline constexpr int kWarpSize = 32;
inline constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ int lane_id() { return threadIdx.x % kWarpSize; }
__device__ __forceinline__ int warp_id() { return threadIdx.x / kWarpSize; }
__device__ __forceinline__ int warps_per_block() { return blockDim.x / kWarpSize; }
__device__ __forceinline__ int global_warp() { return blockIdx.x * warps_per_block() + warp_id(); }
__device__ __forceinline__ int total_warps() { return gridDim.x * warps_per_block(); }

// ---------------------------------------------------------------------------------------------------------
// Copies.

// Where a copy reads from. Inputs of the call are read-only while the kernel runs and may use the non-coherent
// path; buffers that peers write during the kernel must be read coherently.
enum class SourceKind { kInput, kPeerWritten };

template <SourceKind kSource>
__device__ __forceinline__ int4 load_vector(const int4* address) {
  if constexpr (kSource == SourceKind::kInput) {
    return load_stream(address);
  } else {
    return *address;
  }
}

// The one warp copy loop. Word i < n (of any type) is read by load(i) and written by store(dst, i, word) to
// dst = dst_of(lane) for every lane set in `lanes` (dst_of is called by the whole warp, which may shuffle in
// it; dst may be a peer's memory). Each pass loads up to kUnroll words per lane, a partial last pass included,
// before storing any: a pass costs one round trip of latency, and a word read once serves every destination.
// The pass loop is warp-uniform, for dst_of's shuffles.
template <int kUnroll, class Load, class DstOf, class Store>
__device__ __forceinline__ void warp_copy_passes(uint64_t n, unsigned lanes, Load load, DstOf dst_of, Store store) {
  using Word = decltype(load(uint64_t{0}));
  for (uint64_t pass = 0; pass < n; pass += kUnroll * kWarpSize) {
    const uint64_t base = pass + lane_id();
    Word words[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * kWarpSize < n) words[u] = load(base + u * kWarpSize);
    }
    for (unsigned left = lanes; left != 0; left &= left - 1) {
      const auto dst = dst_of(__ffs(left) - 1);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * kWarpSize < n) store(dst, base + u * kWarpSize, words[u]);
      }
    }
  }
}

// 16-byte vectors in flight per lane in a row copy (4 KiB a warp per pass): 32 of a thread's 64 registers
// (kernel_args.h).
inline constexpr int kCopyUnroll = 8;

// `bytes` (a multiple of 16) of 16-byte aligned rows from `src` to dst_of(lane) for every lane set in `lanes`.
template <SourceKind kSource, class DstOf>
__device__ __forceinline__ void warp_copy_16_to_lanes(const void* src, uint64_t bytes, unsigned lanes, DstOf dst_of) {
  const auto* s = static_cast<const int4*>(src);
  warp_copy_passes<kCopyUnroll>(
      bytes / sizeof(int4), lanes, [s](uint64_t i) { return load_vector<kSource>(s + i); },
      [&](int lane) { return reinterpret_cast<int4*>(dst_of(lane)); },
      [](int4* d, uint64_t i, const int4& word) { d[i] = word; });
}

template <SourceKind kSource>
__device__ __forceinline__ void warp_copy_16(void* dst, const void* src, uint64_t bytes) {
  warp_copy_16_to_lanes<kSource>(src, bytes, 1u, [dst](int) { return dst; });
}

// 4-byte words (fp32 scales) at any byte stride, as a caller's scale tensors may be laid out (padded rows,
// column-major): word i of `words` is read at src + i * src_stride and written at dst_of(lane) + i * dst_stride
// for every lane set in `lanes`. 4 words in flight a lane.
template <class DstOf>
__device__ __forceinline__ void warp_copy_4_strided_to_lanes(const uint8_t* src, uint64_t src_stride, uint64_t words,
                                                             unsigned lanes, uint64_t dst_stride, DstOf dst_of) {
  warp_copy_passes<4>(
      words, lanes, [=](uint64_t i) { return *reinterpret_cast<const uint32_t*>(src + i * src_stride); }, dst_of,
      [dst_stride](uint8_t* d, uint64_t i, uint32_t word) { *reinterpret_cast<uint32_t*>(d + i * dst_stride) = word; });
}

// ---------------------------------------------------------------------------------------------------------
// The error record and the bounded wait.

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

// Whether the other ranks have masked this one out (the fault-tolerant mode's wait_failed: its waits then stop).
__device__ __forceinline__ bool masked_out(const ErrorRecord* record) {
  return *reinterpret_cast<const volatile int32_t*>(&record->code) == int32_t(ErrorCode::kMaskedOut);
}

// A wait for `peer` that gave up (a no-op when this rank already recorded an error, a timeout included).
__device__ __forceinline__ void record_timeout(ErrorRecord* record, uint64_t timeout_ns, Phase phase, int32_t peer) {
  record_error(record, ErrorCode::kTimeout, phase, peer, int64_t(timeout_ns / 1000000));
}

// The bound of a wait for peers: it runs out `timeout_ns` after the first poll that found nothing, or as soon
// as another wait of this rank has timed out. The error record lives in host memory: it is looked at every
// 1024 polls, the clock at every one. One bound may span several waits (the pull receive's stalls): it then
// counts from the first.
class WaitBound {
 public:
  __device__ WaitBound(uint64_t timeout_ns, const ErrorRecord* record) : timeout_ns_(timeout_ns), record_(record) {}
  // After a poll that found nothing: whether to give up.
  __device__ __forceinline__ bool ran_out() {
    if ((++polls_ & 1023) == 0 && wait_failed(record_)) return true;
    const uint64_t now = global_timer_ns();
    if (start_ == 0) start_ = now;
    return now - start_ > timeout_ns_;
  }

 private:
  uint64_t timeout_ns_;
  const ErrorRecord* record_;
  uint64_t start_ = 0;
  uint32_t polls_ = 0;
};

// Who polls: one thread, or a whole warp whose poll returns the same for every lane (the wait then gives up on
// every lane at once).
enum class WaitScope { kThread, kWarp };

// What one poll of a bounded wait found.
enum class WaitStep { kArrived, kWaiting, kGaveUp };

// One poll of a bounded wait, for a loop that has other work between polls (the pull receive's): arrived, or
// still waiting (after `sleep_ns`, 0: none, which leaves the SM to other warps where waits are long), or given
// up because `bound` ran out (the caller records the timeout, naming the peer it waited for).
// `bound` is a WaitBound, or any bound with its ran_out() (the fault-tolerant mode's PeerBound, liveness.cuh).
template <WaitScope kScope = WaitScope::kThread, class Arrived, class Bound>
__device__ __forceinline__ WaitStep wait_step(const Arrived& arrived, Bound& bound, uint32_t sleep_ns = 0) {
  if (arrived()) return WaitStep::kArrived;
  bool give_up = bound.ran_out();
  if constexpr (kScope == WaitScope::kWarp) give_up = __any_sync(kFullMask, give_up);
  if (give_up) return WaitStep::kGaveUp;
  if (sleep_ns != 0) __nanosleep(sleep_ns);
  return WaitStep::kWaiting;
}

// The one bounded-wait loop: polls `arrived()` until it returns true (then true), or until `bound` runs out
// (then false; the caller records the timeout).
template <WaitScope kScope = WaitScope::kThread, class Arrived, class Bound>
__device__ __forceinline__ bool wait_until(const Arrived& arrived, Bound& bound, uint32_t sleep_ns = 0) {
  for (;;) {
    const WaitStep step = wait_step<kScope>(arrived, bound, sleep_ns);
    if (step != WaitStep::kWaiting) return step == WaitStep::kArrived;
  }
}

// Waits until `done(*signal)` holds for a value peers write, and returns that value; 0 when the wait gives up
// (recorded as a timeout waiting for `peer` in `phase`).
template <class Done>
__device__ __forceinline__ uint64_t wait_signal_until(const uint64_t* signal, Done done, uint64_t timeout_ns,
                                                      ErrorRecord* record, Phase phase, int32_t peer) {
  uint64_t value = 0;
  WaitBound bound(timeout_ns, record);
  if (wait_until([&] { return done(value = load_acquire_sys(signal)); }, bound)) return value;
  record_timeout(record, timeout_ns, phase, peer);
  return 0;
}

// Waits until a peer sets `*signal` to a non-zero value and returns it (0 on timeout, see above).
__device__ __forceinline__ uint64_t wait_signal(const uint64_t* signal, uint64_t timeout_ns, ErrorRecord* record,
                                                Phase phase, int32_t peer) {
  return wait_signal_until(
      signal, [](uint64_t value) { return value != 0; }, timeout_ns, record, phase, peer);
}

// ---------------------------------------------------------------------------------------------------------
// Scans and phases.

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
    if (prefix[mid] <= value) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Counts blocks out of a phase. Returns true in exactly one block, the last to finish; everything any block
// wrote before its call happens before what that block does next, so it may signal peers or reset shared
// state (and must reset the counter itself). Call with the whole block.
// Ordering without a system fence (fence.sc.sys costs microseconds a call): each block's barrier
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
