// Arguments of the high-throughput kernels: one plain struct, filled by the host and passed by value, and the
// typed view of the handle's arrays.
#pragma once

#include <cstdint>

#include "core/ht_layout.h"
#include "device/error_record.h"
#include "device/kernel_args.h"
#include "device/rank_state.h"
#include "expertwire/high_throughput.h"
#include "expertwire/strided.h"

namespace expertwire::device {

// The arrays of one handle (core/ht_layout.h, HtHandleLayout, says what each holds).
struct HtHandleView {
  uint32_t* block_counts;
  int32_t* slot_rank_row;
  int32_t* slot_expert_row;
  int32_t* slot_dest;
  uint32_t* recv_base;
  uint32_t* base_at;
  uint32_t* send_base;
  uint32_t* home_base;
  uint32_t* segment_start;
  uint32_t* tokens_per_expert;
  uint32_t* expert_prefix;
  uint32_t* source_m;
  int32_t* recv_slot_row;
  float* recv_slot_weight;
  uint32_t* host_counts;  // host-mapped: num_recv_tokens, num_expert_rows, tokens_per_expert[num_local_experts]
};

// What the fault-tolerant push receive settled about a sender's rows (HtWorkspace::data_settled): the same in every
// block, as settle_count's counts in the low-latency kind.
enum HtDataSettled : uint32_t { kHtDataUnsettled = 0, kHtDataArrived = 1, kHtDataLost = 2 };

// The local workspace: monotonic call counters (the targets of the monotonic signals), phase counters, and the
// fault-tolerant mode's state (device/liveness.cuh).
struct HtWorkspace {
  uint64_t dispatch_calls;
  uint64_t combine_calls;
  uint32_t phase[5];
  uint32_t exchange_failed;  // the running dispatch's count exchange gave up or found another payload size
  uint32_t stopped;          // the fault-tolerant mode: the last count exchange found this rank masked out
  uint32_t push_verdict;     // still_serving_grid's verdicts of the running push data kernel and combine
  uint32_t combine_verdict;
  int32_t active_ranks[kMaxHighThroughputRanks];   // 1 for a rank this one serves with, 0 once masked out
  uint32_t data_settled[kMaxHighThroughputRanks];  // HtDataSettled per sender; cleared by the offsets kernel
  LivenessWords liveness;
};
// kHtAgreeing counts blocks out of the combine's waits before its agreement (the fault-tolerant mode).
enum HtPhaseCounter : int { kHtPublished = 0, kHtPushed = 1, kHtCombineSent = 2, kHtCombineDone = 3, kHtAgreeing = 4 };

struct HtArgs {
  HtLayout l;
  uint8_t* symmetric;
  HtWorkspace* workspace;
  ErrorRecord* error;
  uint64_t timeout_ns;
  bool fault_tolerant;  // AllToAllOptions::fault_tolerant: the kernels' InMode
  HtHandleView h;

  // Dispatch inputs.
  uint32_t m;
  Strided2D<const uint8_t> x;
  uint32_t x_bytes;
  Strided2D<const float> x_scale;
  const void* topk_idx;
  bool topk_idx_int64;
  const float* topk_weights;
  bool x_staged;      // x is dispatch_input_buffer(): not copied
  bool scale_staged;  // x_scale is dispatch_input_scale_buffer()
  // Dispatch outputs.
  HighThroughputDispatchOutputs out;

  // Combine.
  HighThroughputLayout layout;
  const uint8_t* expert_out;
  uint8_t* combine_out;
  bool expert_out_staged;             // expert_out is combine_input_buffer()
  const float* combine_row_weight;    // expert-contiguous row weights; null: recv_slot_weight
  bool combine_carry_slots;           // per-slot values travel back beside the rows
  const float* combine_topk_weights;  // their source
  float* combine_out_topk_weights;    // [m][k]

  template <class T>
  EW_HOST_DEVICE T* local(uint64_t offset) const {
    return reinterpret_cast<T*>(symmetric + offset);
  }

  // What the liveness layer (device/liveness.cuh) asks of either kind's state, as RankContext answers it.
  EW_HOST_DEVICE uint32_t own_rank() const { return l.rank; }
  EW_HOST_DEVICE uint32_t world_size() const { return l.world_size; }
  EW_HOST_DEVICE uint32_t loss_words() const { return l.loss_words; }
  EW_HOST_DEVICE SymmetricRef<uint64_t> loss_post(uint32_t source, uint32_t word) const {
    return {l.loss_post_offset(source, word)};
  }
  template <class T>
  EW_HOST_DEVICE T* local(SymmetricRef<T> ref) const {
    return local<T>(ref.offset);
  }
  EW_HOST_DEVICE int32_t* active_ranks() const { return workspace->active_ranks; }
  EW_HOST_DEVICE LivenessWords* liveness() const { return &workspace->liveness; }
};

}  // namespace expertwire::device
