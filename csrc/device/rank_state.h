// Every region of a rank's buffers as the kernels reach it (typed accessors over core/layout.h's offsets), and
// every reset and epoch step of that state, with why each is safe.
//
// The ordering argument, once. A rank starts dispatch n+1 only after hearing combine n from every rank, and
// every rank announces combine n only after its dispatch receive n has ended, so no row, stamp or slot that a
// peer still reads is overwritten:
//   - send_rows, send_stamps, send_announce (pull dispatch) carry the dispatch's epoch and are never cleared:
//     every rank counts the same collective calls, so a stamp or announcement of another epoch is stale.
//   - combine_slots and routes are rewritten by each dispatch and read by the combine that follows it.
//   - combine_done is cleared by its owner in dispatch send, before it announces that dispatch; every rank hears
//     every rank's announcement of dispatch n+1 before it announces combine n+1, so no clear wipes an arrival.
//   - dispatch_counts (push) are cleared by their owner's receive once it has read them all; a sender signals
//     the next ones only after combine n, which the owner announces after that clear.
//   - send_counts and the phase counters are this rank's alone, reset by the last block out of their phase.
//   - the pull receive's state (expert_rows, sender_next, blocks_done) is local: expert_rows is zeroed when the
//     receive hands the counts over, the rest by the combine that follows, which runs after the receive ended.
// So no kernel ends on a reset that a peer could race with.
#pragma once

#include <cstdint>

#include "core/layout.h"
#include "device/error_record.h"
#include "device/wire_protocol.h"
#include "expertwire/host_device.h"

namespace expertwire::device {

// A T at the same offset of every rank's symmetric buffer: this rank's copy through RankContext::local, a
// peer's through its transport (peer, put_warp, signal, signal_add).
template <class T>
struct SymmetricRef {
  uint64_t offset;
};

// The pull receive's state in the workspace (pull_state): rows of out_expert_x taken per local expert, the next
// token of each sender to take, and the blocks of the grid whose receive has ended.
struct PullReceiveState {
  uint32_t* expert_rows;  // [num_local_experts]; the push receive takes rows with it too
  uint32_t* sender_next;  // [num_dp_groups]
  uint32_t* blocks_done;
};

// The fault-tolerant mode's counters in the workspace (liveness), each written by this rank only.
struct LivenessWords {
  uint32_t news;    // bumped whenever this rank gives up on one more rank: waits then count their timeout anew
  uint32_t calls;   // agreements finished: the call that the next agreement is for (LossPost::sequence)
  uint32_t agreed;  // calls + 1 once the running combine's agreement is done, for the blocks that wait on it
  uint32_t posted;  // the sequence of this rank's last LossPost, which every later post of this call repeats
};
static_assert(sizeof(LivenessWords) == kLivenessWordsBytes, "the liveness region is kLivenessWordsBytes");

// What every kernel knows about this rank.
struct RankContext {
  BufferLayout layout;
  uint32_t rank;
  uint32_t dp_rank;
  uint32_t dp_group;
  uint8_t* symmetric;  // this rank's symmetric buffer
  uint8_t* workspace;  // this rank's local workspace
  ErrorRecord* error;  // host-mapped
  uint64_t timeout_ns;
  bool fault_tolerant;  // AllToAllOptions::fault_tolerant (device/liveness.cuh)

  template <class T>
  EW_HOST_DEVICE T* local(SymmetricRef<T> ref) const {
    return reinterpret_cast<T*>(symmetric + ref.offset);
  }

  // What the liveness layer (device/liveness.cuh) asks of either kind's state (HtArgs answers the same).
  EW_HOST_DEVICE uint32_t own_rank() const { return rank; }
  EW_HOST_DEVICE uint32_t world_size() const { return layout.world_size; }
  EW_HOST_DEVICE uint32_t loss_words() const { return layout.loss_words; }

  // Symmetric regions. Rows are bytes; signals u64.
  EW_HOST_DEVICE SymmetricRef<uint8_t> dispatch_token(uint32_t source_group, uint32_t slot) const {
    return {layout.dispatch_token_offset(source_group, slot)};
  }
  EW_HOST_DEVICE SymmetricRef<uint8_t> combine_row(uint32_t token, uint32_t k) const {
    return {layout.combine_row_offset(token, k)};
  }
  EW_HOST_DEVICE SymmetricRef<uint64_t> dispatch_count(uint32_t source_rank) const {  // DispatchCount
    return {layout.dispatch_count_offset(source_rank)};
  }
  EW_HOST_DEVICE SymmetricRef<uint64_t> combine_done(uint32_t source_rank) const {  // ArrivalSignal
    return {layout.combine_done_offset_of(source_rank)};
  }
  EW_HOST_DEVICE SymmetricRef<uint8_t> staging_row(uint64_t slot) const { return {layout.staging_row_offset(slot)}; }
  EW_HOST_DEVICE SymmetricRef<uint8_t> send_row(uint32_t token) const { return {layout.send_row_offset(token)}; }
  EW_HOST_DEVICE SymmetricRef<uint64_t> send_announce() const {  // DispatchEpoch::announcement
    return {layout.send_announce_offset};
  }
  EW_HOST_DEVICE SymmetricRef<uint64_t> send_stamp(uint32_t token) const {  // an epoch
    return {layout.send_stamp_offset(token)};
  }
  EW_HOST_DEVICE SymmetricRef<uint32_t> combine_slot(uint32_t source_group, uint32_t token, uint32_t k) const {
    return {layout.combine_slot_offset(source_group, token, k)};
  }
  EW_HOST_DEVICE SymmetricRef<uint8_t> expert_output(uint32_t local_expert, uint32_t row) const {
    return {layout.expert_output_offset(local_expert, row)};
  }
  EW_HOST_DEVICE const uint8_t* expert_outputs() const { return symmetric + layout.expert_outputs_offset; }
  EW_HOST_DEVICE SymmetricRef<uint64_t> loss_post(uint32_t source_rank, uint32_t word) const {  // LossPost
    return {layout.loss_post_offset(source_rank, word)};
  }

  // Workspace regions.
  EW_HOST_DEVICE uint32_t* send_counts() const { return in_workspace<uint32_t>(layout.send_counts_offset); }
  EW_HOST_DEVICE int32_t* recv_counts() const { return in_workspace<int32_t>(layout.recv_counts_offset); }
  EW_HOST_DEVICE TokenRoute* routes() const { return in_workspace<TokenRoute>(layout.routes_offset); }
  EW_HOST_DEVICE uint32_t* phase_counter(PhaseCounter which) const {
    return in_workspace<uint32_t>(layout.phase_counters_offset) + which;
  }
  EW_HOST_DEVICE PullReceiveState pull_state() const {
    uint32_t* words = in_workspace<uint32_t>(layout.pull_state_offset);
    return PullReceiveState{words, words + layout.num_local_experts,
                            words + layout.num_local_experts + layout.num_dp_groups};
  }
  EW_HOST_DEVICE uint32_t* dispatch_epoch_counter() const {
    return in_workspace<uint32_t>(layout.dispatch_epoch_offset);
  }
  EW_HOST_DEVICE int32_t* active_ranks() const { return in_workspace<int32_t>(layout.active_ranks_offset); }
  EW_HOST_DEVICE LivenessWords* liveness() const { return in_workspace<LivenessWords>(layout.liveness_offset); }
  EW_HOST_DEVICE uint64_t* settled_counts() const { return in_workspace<uint64_t>(layout.settled_counts_offset); }

 private:
  template <class T>
  EW_HOST_DEVICE T* in_workspace(uint64_t offset) const {
    return reinterpret_cast<T*>(workspace + offset);
  }
};

#if defined(__CUDACC__)

// A kernel's Transport in the object's mode (RankContext::fault_tolerant): the kernels are instantiated once per
// mode, so that the default mode's compile without any fault-tolerant path (they made its kernels spill
// registers). Code that differs by mode asks Transport::kFaultTolerant.
template <class Transport, bool kFaultTolerantMode>
struct InMode : Transport {
  static constexpr bool kFaultTolerant = kFaultTolerantMode;
};

// launch(transport) with `transport` in the object's mode: the kernel instantiation of that mode.
template <class Transport, class Launch>
void in_object_mode(bool fault_tolerant, const Transport& transport, Launch launch) {
  if (fault_tolerant) {
    launch(InMode<Transport, true>{transport});
  } else {
    launch(InMode<Transport, false>{transport});
  }
}

// Whether this rank has given up on `rank` (the fault-tolerant mode's mask; `c` a RankContext or HtArgs). Other
// threads of this rank clear active_ranks entries while kernels run, so it is read through volatile.
template <class Peers>
__device__ __forceinline__ bool marked_lost(const Peers& c, uint32_t rank) {
  return *reinterpret_cast<const volatile int32_t*>(&c.active_ranks()[rank]) == 0;
}

// marked_lost in the fault-tolerant mode; never in the default mode.
template <class Transport, class Peers>
__device__ __forceinline__ bool is_lost(const Transport&, const Peers& c, uint32_t rank) {
  if constexpr (Transport::kFaultTolerant) {
    return marked_lost(c, rank);
  } else {
    return false;
  }
}

// This rank's running pull dispatch (DispatchEpoch): constant from the dispatch's send to the combine that
// follows it.
__device__ __forceinline__ uint32_t current_dispatch_epoch(const RankContext& c) {
  return DispatchEpoch::of(*c.dispatch_epoch_counter());
}

// combine_done, for this round: cleared by block 0 of either dispatch send, before the dispatch announces itself
// (the announcement's release carries the clears).
__device__ __forceinline__ void clear_combine_done(const RankContext& c) {
  if (blockIdx.x != 0) return;
  for (uint32_t peer = threadIdx.x; peer < c.layout.world_size; peer += blockDim.x) {
    *c.local(c.combine_done(peer)) = 0;
  }
}

// The push send's count for `rank`, zeroed for the next dispatch (its last block out reads every count).
__device__ __forceinline__ uint32_t take_send_count(const RankContext& c, uint32_t rank) {
  const uint32_t count = c.send_counts()[rank];
  c.send_counts()[rank] = 0;
  return count;
}

// A phase counter, reset by the last block out of its phase (last_block_out).
__device__ __forceinline__ void reset_phase_counter(const RankContext& c, PhaseCounter which) {
  if (threadIdx.x == 0) *c.phase_counter(which) = 0;
}

// dispatch_counts, cleared by the push receive's last block out once every count has been read.
__device__ __forceinline__ void clear_dispatch_counts(const RankContext& c) {
  for (uint32_t source = threadIdx.x; source < c.layout.world_size; source += blockDim.x) {
    *c.local(c.dispatch_count(source)) = 0;
  }
}

// Hands each local expert's row count to the caller (out_expert_num_tokens) and to combine (recv_counts), and
// zeroes expert_rows for the next dispatch. Called by the receive's last block out, once every row is taken.
__device__ __forceinline__ void hand_over_expert_rows(const RankContext& c, int32_t* out_expert_num_tokens) {
  const PullReceiveState state = c.pull_state();
  for (uint32_t le = threadIdx.x; le < c.layout.num_local_experts; le += blockDim.x) {
    const int32_t rows = int32_t(min(__ldcg(&state.expert_rows[le]), c.layout.max_recv_tokens));
    out_expert_num_tokens[le] = rows;
    c.recv_counts()[le] = rows;
    state.expert_rows[le] = 0;
  }
}

// The rest of the pull receive's state, zeroed, and the epoch advanced, for dispatch n+1: called by block 0 of
// the pull combine's send, which runs after this rank's dispatch n has ended.
__device__ __forceinline__ void finish_pull_dispatch(const RankContext& c) {
  if (blockIdx.x != 0) return;
  const PullReceiveState state = c.pull_state();
  const uint64_t words = c.layout.pull_state_words() - c.layout.num_local_experts;
  for (uint64_t i = threadIdx.x; i < words; i += blockDim.x) state.sender_next[i] = 0;
  if (threadIdx.x == 0) *c.dispatch_epoch_counter() = DispatchEpoch::advance(*c.dispatch_epoch_counter());
}

#endif  // __CUDACC__

}  // namespace expertwire::device
