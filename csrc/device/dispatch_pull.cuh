// The pull dispatch, when every peer's buffer is load/store reachable: each rank stages its tokens once in its
// own send_rows, and receivers copy them straight from there into out_expert_x (wire_protocol.h).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "device/kernel_args.h"
#include "device/liveness.cuh"
#include "device/primitives.cuh"
#include "device/tokens.cuh"

namespace expertwire::device {

// Stages our tokens in send_rows for the receivers to pull: the announcement first, then each row, stamped with
// this dispatch's epoch once it is written.
__device__ inline void dispatch_pull_send(const DispatchArgs& a) {
  const RankContext& c = a.ctx;
  const BufferLayout& l = c.layout;
  const uint32_t m = read_bound_m(a.bound_m, a.m, c.error, Phase::kDispatchSend);
  const uint32_t epoch = current_dispatch_epoch(c);
  const uint32_t top_k = l.experts_per_token;
  clear_combine_done(c);
  if (blockIdx.x == 0) {
    __syncthreads();  // the clears before the announcement, which releases them (rank_state.h)
    if (threadIdx.x == 0) store_release_sys(c.local(c.send_announce()), DispatchEpoch::announcement(epoch, m));
  }
  for (uint32_t t = global_warp(); t < m; t += total_warps()) {
    const ExpertRow experts(a.indices, t, top_k);
    for (uint32_t k0 = 0; k0 < top_k; k0 += kWarpSize) {
      const uint32_t k = k0 + lane_id();
      check_row_expert(c, experts, k0, k < top_k ? experts[k] : ~0u, k < top_k);
    }
    write_dispatch_token(c.local(c.send_row(t)), l, t, experts, input_payload(a, t), input_scales(a, t),
                         a.dp_x_scale.element_stride, !a.dp_x_in_send_rows, !a.dp_x_scale_in_send_rows, a.cast);
    __syncwarp();  // every lane's part of the row before the stamp, whose release carries it (cumulative)
    if (lane_id() == 0) store_release_sys(c.local(c.send_stamp(t)), epoch);
  }
}

// The pull receive. Ranks enter a kernel microseconds apart (ranks sharing a GPU under MPS most of all), and a
// sender stages its rows over microseconds more, so warps copy each row as soon as its sender has stamped it: a warp
// takes the next token of a sender it has heard from (a ticket), waits for that row's stamp, and copies it to each
// local expert it names, at the next free row of that expert's block of out_expert_x. Rows thus land in arrival order;
// combine_slots remembers where each went. A lost sender (fault-tolerant mode) is closed: nothing more is taken
// from it.
template <class Transport>
__device__ void dispatch_pull_recv(const DispatchArgs& a, const Transport& transport) {
  const RankContext& c = a.ctx;
  const BufferLayout& l = c.layout;
  const uint32_t groups = l.num_dp_groups;
  const uint32_t lane = uint32_t(lane_id());
  const uint32_t epoch = current_dispatch_epoch(c);
  auto sender = [&](uint32_t group) { return int(group * l.dp_size + c.dp_rank); };
  const PullReceiveState state = c.pull_state();

  extern __shared__ uint32_t shared[];
  uint32_t* seen = shared + PullDispatchShared::warp_views_word(l, uint32_t(warp_id()));  // SenderView per group
  constexpr uint32_t kClosed = SenderView::heard(0) | SenderView::kAllTaken;
  for (uint32_t g = lane; g < groups; g += kWarpSize)
    seen[g] = is_lost(transport, c, uint32_t(sender(g))) ? kClosed : 0u;
  __syncwarp();

  // Warps start from different senders, so they spread over the ready ones.
  const uint32_t rotation = (uint32_t(global_warp()) + c.rank) % groups;
  // Every stall of this warp waiting for announcements counts against one bound, from the first.
  PeerBound stalls(transport, c, Phase::kDispatchRecv, -1);
  // Lane 0 asks for the next token of the sender it copies from before copying the current one, which hides
  // the atomic's latency; the held ticket is used first (a sender whose tokens are not all taken stays chosen).
  int held_group = -1;
  uint32_t held_ticket = 0;
  // A ticket for a token of group g's sender, or m_g once they are all taken. Every warp of the grid asks every
  // sender for tickets, and with many warps per token most find them all taken: the load spares those the
  // atomic, on one address all of them would queue on, and a warp that copied the last token does not wait
  // behind that queue for a held ticket it cannot use.
  auto take_ticket = [&](uint32_t g, uint32_t m_g) {
    return __ldcg(&state.sender_next[g]) >= m_g ? m_g : atomicAdd(&state.sender_next[g], 1u);
  };
  // Reads the announcement of every sender this warp has not heard from; whether any was new.
  auto hear_new_senders = [&] {
    __syncwarp();  // every lane has read `seen` before any lane writes it
    bool progress = false;
    for (uint32_t g = lane; g < groups; g += kWarpSize) {
      if (SenderView::is_heard(seen[g])) continue;
      if (is_lost(transport, c, uint32_t(sender(g)))) {
        seen[g] = kClosed;
        progress = true;
        continue;
      }
      const uint64_t announced = load_acquire_sys(transport.peer(sender(g), c.send_announce()));
      if (DispatchEpoch::announced_epoch(announced) == epoch) {
        seen[g] = SenderView::heard(min(DispatchEpoch::announced_tokens(announced), l.max_num_tokens));
        progress = true;
      }
    }
    __syncwarp();
    return __any_sync(kFullMask, progress);
  };
  for (;;) {
    // The first sender, from the rotation on, that this warp has heard from and whose tokens are not all
    // taken; the others are polled only when there is none.
    int chosen = held_group;
    bool open = chosen >= 0;
    for (uint32_t base = 0; base < groups && chosen < 0; base += kWarpSize) {
      const uint32_t i = base + lane, g = (i + rotation) % groups;
      const uint32_t view = i < groups ? seen[g] : SenderView::kAllTaken;
      open |= __ballot_sync(kFullMask, !SenderView::all_taken(view)) != 0;
      const unsigned ready = __ballot_sync(kFullMask, SenderView::is_heard(view) && !SenderView::all_taken(view));
      if (ready != 0) chosen = int(__shfl_sync(kFullMask, g, __ffs(ready) - 1));
    }
    if (!open) break;
    if (chosen < 0) {
      // Every sender still open is late: poll their announcements again (the loop then chooses anew), within
      // the timeout, or stop once another wait failed.
      if (wait_step<WaitScope::kWarp>(hear_new_senders, stalls, 128) == WaitStep::kGaveUp) {
        if (Transport::kFaultTolerant && !masked_out(c.error)) {
          // Every sender still unheard is given up on, and the others still served.
          __syncwarp();
          for (uint32_t g = lane; g < groups; g += kWarpSize) {
            if (SenderView::is_heard(seen[g])) continue;
            give_up_on(c, transport, Phase::kDispatchRecv, uint32_t(sender(g)));
            seen[g] = kClosed;
          }
          __syncwarp();
          continue;
        }
        const unsigned late = __ballot_sync(kFullMask, lane < groups && !SenderView::is_heard(seen[lane]));
        if (lane == 0 && !Transport::kFaultTolerant) {
          record_timeout(c.error, c.timeout_ns, Phase::kDispatchRecv,
                         late != 0 ? sender(uint32_t(__ffs(late) - 1)) : -1);
        }
        break;
      }
      continue;
    }

    const uint32_t g = uint32_t(chosen), m_g = SenderView::tokens(seen[g]);
    uint32_t t = held_ticket;
    if (held_group < 0 && lane == 0) t = take_ticket(g, m_g);
    t = __shfl_sync(kFullMask, t, 0);
    held_group = -1;
    if (t >= m_g) {
      __syncwarp();  // every lane has read seen[g] before lane 0 writes it
      if (lane == 0) seen[g] |= SenderView::kAllTaken;
      __syncwarp();
      continue;
    }
    held_ticket = lane == 0 ? take_ticket(g, m_g) : 0u;
    held_group = int(g);
    uint64_t stamp = 0;
    if (lane == 0) {
      stamp = wait_for_peer(
          c, transport, transport.peer(sender(g), c.send_stamp(t)), [&](uint64_t value) { return value == epoch; },
          Phase::kDispatchRecv, uint32_t(sender(g)));
    }
    __syncwarp();  // lane 0's acquire of the stamp before any lane reads the row
    if (__shfl_sync(kFullMask, stamp, 0) == 0) {
      // Gave up on the sender: in the default mode the receive ends (the timeout is recorded); in the
      // fault-tolerant mode the sender is closed and the others still served.
      if (!Transport::kFaultTolerant || masked_out(c.error)) break;
      if (lane == 0) seen[g] = kClosed;
      __syncwarp();
      held_group = -1;
      continue;
    }
    copy_token_to_local_experts(a, transport.peer(sender(g), c.send_row(t)), g, t, sender(g),
                                [&](uint32_t le) { return atomicAdd(&state.expert_rows[le], 1u); });
  }

  // Each expert's row count is final once every warp has left its loop, having taken every row it copies: the
  // last block out (one atomic a block, not a warp: fewer to serialize) hands the counts over. It also hears
  // from the ranks of other dp_ranks, which send us nothing: each must have cleared its combine_done for this
  // round before our combine adds to it (rank_state.h).
  if (last_block_out(state.blocks_done)) {
    for (uint32_t source = threadIdx.x; source < l.world_size; source += blockDim.x) {
      if (source % l.dp_size == c.dp_rank) continue;
      wait_for_peer(
          c, transport, transport.peer(int(source), c.send_announce()),
          [&](uint64_t value) { return DispatchEpoch::announced_epoch(value) == epoch; }, Phase::kDispatchRecv, source);
    }
    hand_over_expert_rows(c, a.out_expert_num_tokens);
  }
}

template <class Transport>
__global__ void __launch_bounds__(kMaxBlockThreads, kMinBlocksPerSm)
    dispatch_pull_kernel(DispatchArgs args, Transport transport) {
  if (args.do_send && (!Transport::kFaultTolerant || still_serving(args.ctx, Phase::kDispatchSend))) {
    dispatch_pull_send(args);
  }
  if (args.do_recv) dispatch_pull_recv(args, transport);
}

}  // namespace expertwire::device
