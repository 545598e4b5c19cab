// The push dispatch, for transports where some peer is reachable only by puts: each token goes once to each
// rank that owns one of its experts, into that rank's dispatch_recv region for our DP group; every sender then
// tells every rank its count (wire_protocol.h).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "device/delivery.cuh"
#include "device/kernel_args.h"
#include "device/liveness.cuh"
#include "device/primitives.cuh"
#include "device/tokens.cuh"

namespace expertwire::device {

template <class Transport>
__device__ void dispatch_push_send(const DispatchArgs& a, const Transport& transport) {
  const RankContext& c = a.ctx;
  const BufferLayout& l = c.layout;
  const uint32_t m = read_bound_m(a.bound_m, a.m, c.error, Phase::kDispatchSend);
  uint32_t* send_counts = c.send_counts();
  uint8_t* staging = c.local(c.staging_row(global_warp()));
  const uint32_t top_k = l.experts_per_token;
  clear_combine_done(c);
  bool issued_puts = false;

  for (uint32_t t = global_warp(); t < m; t += total_warps()) {
    const ExpertRow experts(a.indices, t, top_k);
    const uint8_t* x = input_payload(a, t);
    const uint8_t* x_scale = input_scales(a, t);
    bool staged = false;
    for (uint32_t k0 = 0; k0 < top_k; k0 += kWarpSize) {
      const uint32_t k = k0 + lane_id();
      const uint32_t expert = k < top_k ? experts[k] : ~0u;
      check_row_expert(c, experts, k0, expert, k < top_k);
      // The token goes to a rank once, from the first k that names one of its experts; never to a lost one.
      const uint32_t owner = owner_of(l, expert);
      const bool send = first_in_row(experts, k0, owner, [&](uint32_t e) { return owner_of(l, e); }) && owner != ~0u &&
                        owner % l.dp_size == c.dp_rank && !is_lost(transport, c, owner);
      // A rank gets each token at most once, so its slots stay below m <= max_num_tokens.
      const uint32_t slot = send ? atomicAdd(&send_counts[owner], 1u) : 0u;
      for (unsigned pending = __ballot_sync(kFullMask, send); pending != 0; pending &= pending - 1) {
        const int from = __ffs(pending) - 1;
        const int rank = int(__shfl_sync(kFullMask, owner, from));
        const uint32_t s = __shfl_sync(kFullMask, slot, from);
        issued_puts |= deliver_row(transport, rank, c.dispatch_token(c.dp_group, s), l.dispatch_token_bytes, staging,
                                   staged, [&](uint8_t* dst) {
                                     write_dispatch_token(dst, l, t, experts, x, x_scale, a.dp_x_scale.element_stride,
                                                          true, true, a.cast);
                                   });
      }
    }
  }
  transport.flush_warp(issued_puts);

  if (last_block_out(c.phase_counter(kDispatchSendDone))) {
    for (uint32_t rank = threadIdx.x; rank < l.world_size; rank += blockDim.x) {
      // 0 for ranks of other dp_ranks: they still hear from us.
      const uint32_t count = take_send_count(c, rank);
      if (!is_lost(transport, c, rank))
        transport.signal(int(rank), c.dispatch_count(c.rank), DispatchCount::encode(count));
    }
    reset_phase_counter(c, kDispatchSendDone);
  }
}

// Waits for every rank's count, then copies each token in dispatch_recv to each local expert its row names, at
// that expert's next free row, as the pull receive does (rows in no particular order; routes remember them).
// The last block out hands the counts over and clears the counts. A lost sender counts as one that sent nothing.
// Call with the whole block.
template <class Transport>
__device__ void dispatch_push_recv(const DispatchArgs& a, const Transport& transport) {
  const RankContext& c = a.ctx;
  const BufferLayout& l = c.layout;
  const uint32_t groups = l.num_dp_groups;

  extern __shared__ uint32_t shared[];
  uint32_t* group_count = shared + PushDispatchShared::group_count_word();   // [group]: tokens its sender put here
  uint32_t* group_start = shared + PushDispatchShared::group_start_word(l);  // exclusive scan, [groups + 1]

  // Every sender reports to every rank; only the sender of our dp_rank in each group can have sent tokens.
  for (uint32_t source = threadIdx.x; source < l.world_size; source += blockDim.x) {
    const bool lost_before = is_lost(transport, c, source);
    uint64_t value = wait_for_peer(c, transport, c.local(c.dispatch_count(source)), DispatchCount::arrived,
                                   Phase::kDispatchRecv, source);
    if constexpr (Transport::kFaultTolerant) value = settle_count(c, source, value, lost_before);
    if (source % l.dp_size == c.dp_rank) {
      group_count[source / l.dp_size] =
          DispatchCount::arrived(value) ? min(DispatchCount::tokens(value), l.max_num_tokens) : 0u;
    }
  }
  __syncthreads();
  if (warp_id() == 0) warp_exclusive_scan(group_count, group_start, groups);
  __syncthreads();

  const PullReceiveState state = c.pull_state();
  const uint32_t total = group_start[groups];
  for (uint32_t j = global_warp(); j < total; j += total_warps()) {
    const uint32_t g = find_segment(group_start, groups, j);
    const uint8_t* token = c.local(c.dispatch_token(g, j - group_start[g]));
    copy_token_to_local_experts(a, token, g, reinterpret_cast<const uint32_t*>(token)[0],
                                int(g * l.dp_size + c.dp_rank),
                                [&](uint32_t le) { return atomicAdd(&state.expert_rows[le], 1u); });
  }

  if (last_block_out(c.phase_counter(kDispatchRecvDone))) {
    hand_over_expert_rows(c, a.out_expert_num_tokens);
    clear_dispatch_counts(c);
    if constexpr (Transport::kFaultTolerant) {
      for (uint32_t source = threadIdx.x; source < l.world_size; source += blockDim.x) c.settled_counts()[source] = 0;
    }
    reset_phase_counter(c, kDispatchRecvDone);
  }
}

template <class Transport>
__global__ void __launch_bounds__(kMaxBlockThreads, kMinBlocksPerSm)
    dispatch_push_kernel(DispatchArgs args, Transport transport) {
  if (args.do_send && (!Transport::kFaultTolerant || still_serving(args.ctx, Phase::kDispatchSend))) {
    dispatch_push_send(args, transport);
  }
  if (args.do_recv) dispatch_push_recv(args, transport);
}

}  // namespace expertwire::device
