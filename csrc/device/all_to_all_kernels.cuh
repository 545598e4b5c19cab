// Dispatch and combine kernels, written once for every transport.
//
// A Transport (see transport/*/…_transport.cuh) says how bytes reach a peer's symmetric buffer:
//   static constexpr bool kMayPut                     // false: peer_address never returns nullptr
//   bool load_store_only()                            // (host) every peer has a load/store address
//   uint8_t* peer_address(int pe, uint64_t offset)   // load/store address of the peer's byte, or nullptr
//   void put_warp(int pe, uint64_t offset, const uint8_t* staged, uint64_t bytes)  // for nullptr peers
//   void flush_warp()                                 // this warp's writes complete before a later signal
//   void signal(int pe, uint64_t offset, uint64_t value)       // set, with release
//   void signal_add(int pe, uint64_t offset, uint64_t value)   // add, with release
//
// Protocol (one call = dispatch then combine; every rank takes part in both). Dispatch comes in two forms:
// push, for transports where some peer is reachable only by puts, and pull, when every peer's buffer can be
// loaded from directly (NVLink, or ranks sharing a GPU), which moves each token's bytes once instead of twice.
//   pull send       announce m (send_announce), then stage the tokens (header with their experts, payload,
//                   scales) in our send_rows, stamping each row with this dispatch's epoch once it is written;
//                   a payload or scales the caller wrote there itself (dispatch_input_buffer) is not copied.
//   pull recv       copy each stamped token of the sender of our dp_rank in each group, as soon as it is stamped,
//                   from its send_rows straight into out_expert_x, to every local expert its row names, at that
//                   expert's next free row; each expert's count is the rows taken.
//   dispatch send   each token goes once to each rank that owns one of its experts and whose dp_rank is ours,
//                   into slot atomicAdd(send_counts[rank]) of that rank's region for our DP group; the last
//                   block out then sends every rank its count + 1, zeros included, so every receiver hears from
//                   every sender.
//   dispatch recv   wait for all world_size counts, copy each received token to every local expert its row
//                   names, at that expert's next free row, and remember each row's route; the last block out
//                   clears the counts.
//   combine send    each row i of expert_y[le] goes back to row (token, k) of combine_recv of every rank of its
//                   source group (a float32 expert_y's rows as out_tokens' 16-bit type); each block then adds its
//                   arrival to every rank's combine_done.
//   combine recv    wait until every rank's combine_done is complete, out[t] = sum_k w[t][k] * row(t, k).
// Combine also comes in a pull form for load/store transports, in which the rows do not move at all when the
// experts wrote their outputs into expert_outputs themselves:
//   pull dispatch   besides copying, records in combine_slots where each (group, token, k) row lands.
//   pull send       when expert_y is our expert_outputs, nothing moves; else (the caller's expert_y, which no
//                   peer can read) its rows are pushed as in the combine send. Each block then adds its arrival
//                   to every rank's combine_done, block 0's saying which of the two it was (CombineRowsAt).
//   pull recv       wait until every rank's combine_done is complete, out[t] = sum_k w[t][k] * row(t, k), reading
//                   row (t, k) from our combine_recv if its owner pushed it, else straight from the owner's
//                   expert_outputs, at the slot it recorded.
// A rank can only start dispatch n+1 after hearing combine n from every rank, and every rank announces combine
// n only after its dispatch-recv n has finished, so no row, stamp or slot is overwritten while a peer still
// reads it. The pull dispatch's announcements and stamps carry the dispatch's epoch (every rank counts the same
// collective calls) and are never cleared. combine_done is cleared by its owner in dispatch send, before it
// announces that dispatch, and every rank hears every rank's announcement of dispatch n+1 before it announces
// combine n+1, so no kernel ends on a reset and no clear wipes an arrival. The receive state of the pull
// dispatch (local) is zeroed by the combine that follows it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "core/cuda_utils.h"
#include "core/dtype.h"
#include "core/layout.h"
#include "device/kernel_args.h"
#include "device/primitives.cuh"

namespace expertwire::device {

// ---------------------------------------------------------------------------------------------------------
// Token rows.

// Writes one DispatchToken (header, payload, scales) at `dst` with the whole warp; the payload and the scales
// only when `copy_payload` and `copy_scales` (false: the caller wrote them at dst itself). `x_scale`: the
// token's row of dp_x_scale, whose words lie `scale_word_stride` bytes apart.
__device__ __forceinline__ void write_dispatch_token(uint8_t* dst, const BufferLayout& l, uint32_t token,
                                                     const uint32_t* experts, const uint8_t* x,
                                                     const uint8_t* x_scale, uint64_t scale_word_stride,
                                                     bool copy_payload = true, bool copy_scales = true) {
  auto* header = reinterpret_cast<uint32_t*>(dst);
  for (uint32_t w = lane_id(); w <= l.experts_per_token; w += kWarpSize) {
    header[w] = w == 0 ? token : experts[w - 1];
  }
  if (copy_payload) warp_copy_16<SourceKind::kInput>(dst + l.payload_offset_in_token(), x, l.hidden_dim_bytes);
  if (copy_scales && l.hidden_dim_scale_bytes != 0) {
    warp_copy_4_strided_to_lanes(x_scale, scale_word_stride, l.hidden_dim_scale_bytes / 4, 1u, 4,
                                 [dst, &l](int) { return dst + l.scale_offset_in_token(); });
  }
}

// Writes one row to `offset` of peer `pe` with the whole warp. `write(dst)` produces the row at dst: straight
// into the peer's memory when it is mapped, else once into `staging` (`staged` remembers it across
// destinations) and from there by a put. With `staged` already true, `staging` is the row itself, in this rank's
// symmetric buffer, and is only read.
template <class Transport, class WriteRow>
__device__ __forceinline__ void deliver_row(const Transport& transport, int pe, uint64_t offset, uint64_t bytes,
                                            uint8_t* staging, bool& staged, WriteRow write) {
  uint8_t* direct = transport.peer_address(pe, offset);
  if (!Transport::kMayPut || direct != nullptr) {
    write(direct);
    return;
  }
  if constexpr (Transport::kMayPut) {
    if (!staged) {
      write(staging);
      __syncwarp();
      staged = true;
    }
    transport.put_warp(pe, offset, staging, bytes);
  }
}

// Tells every rank that this block's part of a phase is written: its ArrivalSignal share at `offset`, added
// with release after the block's barrier, so it carries every thread's writes (release is cumulative). Call
// with the whole block, after the block's puts are flushed.
template <class Transport>
__device__ __forceinline__ void announce_block_arrival(const RankContext& c, const Transport& transport,
                                                       uint64_t offset, uint32_t payload) {
  __syncthreads();
  const uint64_t share = ArrivalSignal::share(blockIdx.x, gridDim.x, payload);
  for (uint32_t peer = threadIdx.x; peer < c.layout.world_size; peer += blockDim.x) {
    transport.signal_add(int(peer), offset, share);
  }
}

// Dispatch n+1 starts after this rank's combine n read its combine_done flags, and no peer announces combine
// n+1 before this dispatch announces itself: block 0 clears them first.
__device__ __forceinline__ void clear_combine_done(const RankContext& c) {
  if (blockIdx.x != 0) return;
  for (uint32_t peer = threadIdx.x; peer < c.layout.world_size; peer += blockDim.x) {
    *c.local_signal(c.layout.combine_done_offset_of(peer)) = 0;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Receiving tokens (both dispatch forms).

// Whether `key` = key_of(experts[k0 + lane]) is the first of its value in the token's row, for the whole warp,
// every lane holding its own: the lanes of this chunk are compared in registers, only earlier chunks (top_k > 32)
// are read again.
template <class KeyOf>
__device__ __forceinline__ bool first_in_row(const uint32_t* experts, uint32_t k0, uint32_t key, KeyOf key_of) {
  const unsigned same = __match_any_sync(kFullMask, key);
  bool first = (same & ((1u << lane_id()) - 1u)) == 0;
  for (uint32_t j = 0; j < k0 && first; ++j) first = key_of(experts[j]) != key;
  return first;
}

// A token's row may repeat an expert only by mistake; the dispatch delivers such a token once, to the first k
// that names the expert, and the sender reports it. Whether experts[k0 + lane] (`expert`) is the first of its
// value (see first_in_row).
__device__ __forceinline__ bool first_in_warp_chunk(const uint32_t* experts, uint32_t k0, uint32_t expert) {
  return first_in_row(experts, k0, expert, [](uint32_t e) { return e; });
}

// Records what is wrong with `expert` = experts[k0 + lane] of a token's row (`in_row`: k0 + lane < top_k): an
// index out of range (never sent) or an expert the row repeats (sent once). Call with the whole warp.
__device__ __forceinline__ void check_row_expert(const RankContext& c, const uint32_t* experts, uint32_t k0,
                                                 uint32_t expert, bool in_row) {
  const bool first = first_in_warp_chunk(experts, k0, expert);
  if (!in_row) return;
  if (expert >= c.layout.num_experts) {
    record_error(c.error, ErrorCode::kBadExpertIndex, Phase::kDispatchSend, -1, expert);
  } else if (!first) {
    record_error(c.error, ErrorCode::kRepeatedExpert, Phase::kDispatchSend, -1, expert);
  }
}

// The pull receive's state, in the workspace's pull_state. The push receive takes rows with expert_rows too;
// both forms' hand-over (hand_over_expert_rows) zeroes it for the next dispatch, and the next pull combine
// zeroes the rest.
struct PullReceiveState {
  uint32_t* expert_rows;  // [num_local]: rows of out_expert_x taken so far, per local expert
  uint32_t* sender_next;  // [groups]: next token of the sender to take
  uint32_t* blocks_done;  // blocks of the grid whose receive has ended

  __device__ explicit PullReceiveState(const RankContext& c) {
    expert_rows = reinterpret_cast<uint32_t*>(c.workspace + c.layout.pull_state_offset);
    sender_next = expert_rows + c.layout.num_local_experts;
    blocks_done = sender_next + c.layout.num_dp_groups;
  }
};

// Hands each local expert's row count to the caller (out_expert_num_tokens) and to combine (recv_counts), and
// zeroes expert_rows for the next dispatch. Call from the receive's last block out, once every row is taken.
__device__ inline void hand_over_expert_rows(const DispatchArgs& a, const PullReceiveState& state) {
  const BufferLayout& l = a.ctx.layout;
  auto* recv_counts = reinterpret_cast<int32_t*>(a.ctx.workspace + l.recv_counts_offset);
  for (uint32_t le = threadIdx.x; le < l.num_local_experts; le += blockDim.x) {
    const int32_t rows = int32_t(min(__ldcg(&state.expert_rows[le]), l.max_recv_tokens));
    a.out_expert_num_tokens[le] = rows;
    recv_counts[le] = rows;
    state.expert_rows[le] = 0;
  }
}

// Copies a received DispatchToken's payload and scales into row `row` of local expert `local_expert` (each
// lane's own) of out_expert_x and out_expert_x_scale for every lane set in `lanes`, with the whole warp: the
// token is read once for all of them. Peers write tokens while kernels run (stores to a sender's send_rows, or
// puts into our dispatch_recv), so it is read coherently.
__device__ __forceinline__ void copy_to_expert_rows(const DispatchArgs& a, const uint8_t* token, unsigned lanes,
                                                    uint32_t local_expert, uint32_t row) {
  const BufferLayout& l = a.ctx.layout;
  warp_copy_16_to_lanes<SourceKind::kPeerWritten>(
      token + l.payload_offset_in_token(), l.hidden_dim_bytes, lanes, [&](int lane) {
        const uint64_t out_row = uint64_t(__shfl_sync(kFullMask, local_expert, lane)) * l.max_recv_tokens +
                                 __shfl_sync(kFullMask, row, lane);
        return a.out_expert_x + out_row * l.hidden_dim_bytes;
      });
  if (l.hidden_dim_scale_bytes != 0) {
    const ScaleStrides& strides = a.out_expert_x_scale_strides;
    warp_copy_4_strided_to_lanes(
        token + l.scale_offset_in_token(), 4, l.hidden_dim_scale_bytes / 4, lanes, strides.word, [&](int lane) {
          const uint32_t lane_expert = __shfl_sync(kFullMask, local_expert, lane);
          return a.out_expert_x_scale + strides.offset(lane_expert, __shfl_sync(kFullMask, row, lane), 0);
        });
  }
}

// Copies token t of the sender of group g, staged at `token`, to each local expert its row names, at the row
// `take_row(local expert)` gives; records each row's route and, for the pull combine, its slot. Call with the
// whole warp.
template <class TakeRow>
__device__ void copy_token_to_local_experts(const DispatchArgs& a, const uint8_t* token, uint32_t g, uint32_t t,
                                            int sender_rank, TakeRow take_row) {
  const RankContext& c = a.ctx;
  const BufferLayout& l = c.layout;
  const uint32_t num_local = l.num_local_experts, top_k = l.experts_per_token, first_expert = c.rank * num_local;
  auto* routes = reinterpret_cast<TokenRoute*>(c.workspace + l.routes_offset);
  const auto* experts = reinterpret_cast<const uint32_t*>(token) + 1;
  for (uint32_t k0 = 0; k0 < top_k; k0 += kWarpSize) {
    const uint32_t k = k0 + lane_id();
    const uint32_t expert = k < top_k ? experts[k] : ~0u;
    bool mine = first_in_warp_chunk(experts, k0, expert) && k < top_k && expert - first_expert < num_local;
    uint32_t row = 0;
    if (mine) {
      const uint32_t le = expert - first_expert;
      row = take_row(le);
      if (row >= l.max_recv_tokens) {
        record_error(c.error, ErrorCode::kSlotOverflow, Phase::kDispatchRecv, sender_rank, expert);
        mine = false;
      } else {
        routes[uint64_t(le) * l.max_recv_tokens + row] = TokenRoute{t, uint16_t(g), uint16_t(k)};
        // For the pull combine; its readers start after this kernel has ended (see the top).
        *reinterpret_cast<uint32_t*>(c.symmetric + l.combine_slot_offset(g, t, k)) = row;
      }
    }
    copy_to_expert_rows(a, token, __ballot_sync(kFullMask, mine), expert - first_expert, row);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Dispatch.

// The rank that owns `expert`, or ~0u (no rank) for an index out of range.
__device__ __forceinline__ uint32_t owner_of(const BufferLayout& l, uint32_t expert) {
  return expert < l.num_experts ? expert / l.num_local_experts : ~0u;
}

template <class Transport>
__device__ void dispatch_send(const DispatchArgs& a, const Transport& transport) {
  const RankContext& c = a.ctx;
  const BufferLayout& l = c.layout;
  const uint32_t m = read_bound_m(a.bound_m, a.m, c.error, Phase::kDispatchSend);
  auto* send_counts = reinterpret_cast<uint32_t*>(c.workspace + l.send_counts_offset);
  uint8_t* staging = c.symmetric + l.staging_row_offset(global_warp());
  const uint32_t top_k = l.experts_per_token;
  clear_combine_done(c);

  for (uint32_t t = global_warp(); t < m; t += total_warps()) {
    const uint32_t* experts = a.indices + uint64_t(t) * top_k;
    const uint8_t* x = a.dp_x + uint64_t(t) * a.dp_x_row_stride;
    const uint8_t* x_scale = a.dp_x_scale + a.dp_x_scale_strides.offset(0, t, 0);
    bool staged = false;
    for (uint32_t k0 = 0; k0 < top_k; k0 += kWarpSize) {
      const uint32_t k = k0 + lane_id();
      const uint32_t expert = k < top_k ? experts[k] : ~0u;
      check_row_expert(c, experts, k0, expert, k < top_k);
      // The token goes to a rank once, from the first k that names one of its experts.
      const uint32_t owner = owner_of(l, expert);
      const bool send = first_in_row(experts, k0, owner, [&](uint32_t e) { return owner_of(l, e); }) &&
                        owner != ~0u && owner % l.dp_size == c.dp_rank;
      // A rank gets each token at most once, so its slots stay below m <= max_num_tokens.
      const uint32_t slot = send ? atomicAdd(&send_counts[owner], 1u) : 0u;
      for (unsigned pending = __ballot_sync(kFullMask, send); pending != 0; pending &= pending - 1) {
        const int from = __ffs(pending) - 1;
        const int rank = int(__shfl_sync(kFullMask, owner, from));
        const uint32_t s = __shfl_sync(kFullMask, slot, from);
        deliver_row(transport, rank, l.dispatch_token_offset(c.dp_group, s), l.dispatch_token_bytes, staging, staged,
                    [&](uint8_t* dst) {
                      write_dispatch_token(dst, l, t, experts, x, x_scale, a.dp_x_scale_strides.word);
                    });
      }
    }
  }
  transport.flush_warp();

  if (last_block_out(c.phase_counter(kDispatchSendDone))) {
    for (uint32_t rank = threadIdx.x; rank < l.world_size; rank += blockDim.x) {
      const uint32_t count = send_counts[rank];  // 0 for ranks of other dp_ranks
      send_counts[rank] = 0;
      transport.signal(int(rank), l.dispatch_count_offset(c.rank), uint64_t(count) + 1);
    }
    if (threadIdx.x == 0) *c.phase_counter(kDispatchSendDone) = 0;
  }
}

// Waits for every rank's count, then copies each token in dispatch_recv to each local expert its row names, at
// that expert's next free row, as the pull receive does (rows in no particular order; routes remember them).
// The last block out hands the counts to the caller (out_expert_num_tokens) and to combine (recv_counts) and
// clears the counts. Call with the whole block.
__device__ inline void dispatch_recv(const DispatchArgs& a) {
  const RankContext& c = a.ctx;
  const BufferLayout& l = c.layout;
  const uint32_t groups = l.num_dp_groups;

  extern __shared__ uint32_t shared[];
  uint32_t* group_count = shared;           // [group]: tokens its sender of our dp_rank put here
  uint32_t* group_start = shared + groups;  // exclusive scan of group_count, [groups + 1]

  // Every sender reports to every rank; only the sender of our dp_rank in each group can have sent tokens.
  for (uint32_t source = threadIdx.x; source < l.world_size; source += blockDim.x) {
    const uint64_t value = wait_signal(c.local_signal(l.dispatch_count_offset(source)), c.timeout_ns, c.error,
                                       Phase::kDispatchRecv, int32_t(source));
    if (source % l.dp_size == c.dp_rank) {
      group_count[source / l.dp_size] = value == 0 ? 0u : min(uint32_t(value - 1), l.max_num_tokens);
    }
  }
  __syncthreads();
  if (warp_id() == 0) warp_exclusive_scan(group_count, group_start, groups);
  __syncthreads();

  const PullReceiveState state(c);
  const uint32_t total = group_start[groups];
  for (uint32_t j = global_warp(); j < total; j += total_warps()) {
    const uint32_t g = find_segment(group_start, groups, j);
    const uint8_t* token = c.symmetric + l.dispatch_token_offset(g, j - group_start[g]);
    copy_token_to_local_experts(a, token, g, reinterpret_cast<const uint32_t*>(token)[0],
                                int(g * l.dp_size + c.dp_rank),
                                [&](uint32_t le) { return atomicAdd(&state.expert_rows[le], 1u); });
  }

  if (last_block_out(c.phase_counter(kDispatchRecvDone))) {
    hand_over_expert_rows(a, state);
    for (uint32_t source = threadIdx.x; source < l.world_size; source += blockDim.x) {
      *c.local_signal(l.dispatch_count_offset(source)) = 0;
    }
    if (threadIdx.x == 0) *c.phase_counter(kDispatchRecvDone) = 0;
  }
}

template <class Transport>
__global__ void __launch_bounds__(kMaxBlockThreads, kMinBlocksPerSm)
    dispatch_kernel(DispatchArgs args, Transport transport) {
  if (args.do_send) dispatch_send(args, transport);
  if (args.do_recv) dispatch_recv(args);
}

// ---------------------------------------------------------------------------------------------------------
// Pull dispatch.

// This rank's running pull dispatch (see DispatchEpoch): constant from the dispatch's send to the combine that
// follows it.
__device__ __forceinline__ uint32_t current_dispatch_epoch(const RankContext& c) {
  return DispatchEpoch::of(*c.dispatch_epoch_counter());
}

// Stages our tokens in send_rows for the receivers to pull: the count first (send_announce), then each row,
// stamped with this dispatch's epoch once it is written.
__device__ inline void dispatch_pull_send(const DispatchArgs& a) {
  const RankContext& c = a.ctx;
  const BufferLayout& l = c.layout;
  const uint32_t m = read_bound_m(a.bound_m, a.m, c.error, Phase::kDispatchSend);
  const uint32_t epoch = current_dispatch_epoch(c);
  const uint32_t top_k = l.experts_per_token;
  clear_combine_done(c);
  if (blockIdx.x == 0) {
    __syncthreads();  // the clears before the announcement, which releases them (see the top)
    if (threadIdx.x == 0) {
      store_release_sys(c.local_signal(l.send_announce_offset), DispatchEpoch::announcement(epoch, m));
    }
  }
  for (uint32_t t = global_warp(); t < m; t += total_warps()) {
    const uint32_t* experts = a.indices + uint64_t(t) * top_k;
    for (uint32_t k0 = 0; k0 < top_k; k0 += kWarpSize) {
      const uint32_t k = k0 + lane_id();
      check_row_expert(c, experts, k0, k < top_k ? experts[k] : ~0u, k < top_k);
    }
    write_dispatch_token(c.symmetric + l.send_row_offset(t), l, t, experts, a.dp_x + uint64_t(t) * a.dp_x_row_stride,
                         a.dp_x_scale + a.dp_x_scale_strides.offset(0, t, 0), a.dp_x_scale_strides.word,
                         !a.dp_x_in_send_rows, !a.dp_x_scale_in_send_rows);
    __syncwarp();  // every lane's part of the row before the stamp, whose release carries it (cumulative)
    if (lane_id() == 0) store_release_sys(c.local_signal(l.send_stamp_offset(t)), epoch);
  }
}

// In a warp's view of a sender (shared memory, one u32 per source group): 0 until the warp has read the
// sender's announcement of this dispatch, then the sender's m + 1, with kAllTaken once the grid has taken
// every token of the sender.
inline constexpr uint32_t kAllTaken = 0x80000000u;

// The pull receive. Ranks enter a kernel several µs apart (up to ~20 µs on one GPU under MPS), and a sender
// stages its rows over several µs more, so warps copy each row as soon as its sender has stamped it: a warp
// takes the next token of a sender it has heard from (a ticket), waits for that row's stamp, and copies it to
// each local expert it names, at the next free row of that expert's block of out_expert_x. Rows thus land in
// arrival order; combine_slots remembers where each went.
template <class Transport>
__device__ void dispatch_pull_recv(const DispatchArgs& a, const Transport& transport) {
  const RankContext& c = a.ctx;
  const BufferLayout& l = c.layout;
  const uint32_t groups = l.num_dp_groups;
  const uint32_t lane = uint32_t(lane_id());
  const uint32_t epoch = current_dispatch_epoch(c);
  auto sender = [&](uint32_t group) { return int(group * l.dp_size + c.dp_rank); };
  auto peer_signal = [&](int pe, uint64_t offset) {
    return reinterpret_cast<const uint64_t*>(transport.peer_address(pe, offset));
  };
  const PullReceiveState state(c);

  extern __shared__ uint32_t shared[];
  uint32_t* seen = shared + uint64_t(warp_id()) * groups;
  for (uint32_t g = lane; g < groups; g += kWarpSize) seen[g] = 0;
  __syncwarp();

  // Warps start from different senders, so they spread over the ready ones.
  const uint32_t rotation = (uint32_t(global_warp()) + c.rank) % groups;
  uint64_t wait_start = 0;
  // Lane 0 asks for the next token of the sender it copies from before copying the current one, which hides
  // the atomic's latency; the held ticket is used first (a sender whose tokens are not all taken stays chosen).
  int held_group = -1;
  uint32_t held_ticket = 0;
  // A ticket for a token of group g's sender, or m_g once they are all taken. Every warp of the grid asks every
  // sender for tickets, and with many warps per token (132 blocks a rank on its own GPU) most find them all
  // taken: the load spares those the atomic, on one address all of them would queue on, and a warp that copied
  // the last token does not wait behind that queue for a held ticket it cannot use (docs/performance.md).
  auto take_ticket = [&](uint32_t g, uint32_t m_g) {
    return __ldcg(&state.sender_next[g]) >= m_g ? m_g : atomicAdd(&state.sender_next[g], 1u);
  };
  for (uint32_t spin = 0;;) {
    // The first sender, from the rotation on, that this warp has heard from and whose tokens are not all
    // taken; the others are polled only when there is none.
    int chosen = held_group;
    bool open = chosen >= 0;
    for (uint32_t base = 0; base < groups && chosen < 0; base += kWarpSize) {
      const uint32_t i = base + lane, g = (i + rotation) % groups;
      const uint32_t view = i < groups ? seen[g] : kAllTaken;
      open |= __ballot_sync(kFullMask, (view & kAllTaken) == 0) != 0;
      const unsigned ready = __ballot_sync(kFullMask, view != 0 && (view & kAllTaken) == 0);
      if (ready != 0) chosen = int(__shfl_sync(kFullMask, g, __ffs(ready) - 1));
    }
    if (!open) break;
    if (chosen < 0) {
      __syncwarp();  // every lane has read `seen` before any lane writes it
      bool progress = false;
      for (uint32_t g = lane; g < groups; g += kWarpSize) {
        if (seen[g] != 0) continue;
        const uint64_t announced = load_acquire_sys(peer_signal(sender(g), l.send_announce_offset));
        if (DispatchEpoch::announced_epoch(announced) == epoch) {
          seen[g] = min(DispatchEpoch::announced_tokens(announced), l.max_num_tokens) + 1;
          progress = true;
        }
      }
      __syncwarp();
      if (__any_sync(kFullMask, progress)) continue;
      // Every sender still open is late: wait, within the timeout, or stop once another wait has failed. The
      // error record lives in host memory: look at it rarely, the clock often.
      if (wait_start == 0) wait_start = global_timer_ns();
      const bool give_up =
          (++spin % 1024 == 0 && wait_failed(c.error)) || global_timer_ns() - wait_start > c.timeout_ns;
      if (__any_sync(kFullMask, give_up)) {
        const unsigned late = __ballot_sync(kFullMask, lane < groups && seen[lane] == 0);
        if (lane == 0) {
          const int peer = late != 0 ? sender(uint32_t(__ffs(late) - 1)) : -1;
          record_error(c.error, ErrorCode::kTimeout, Phase::kDispatchRecv, peer, int64_t(c.timeout_ns / 1000000));
        }
        break;
      }
      __nanosleep(128);
      continue;
    }

    const uint32_t g = uint32_t(chosen), m_g = (seen[g] & ~kAllTaken) - 1;
    uint32_t t = held_ticket;
    if (held_group < 0 && lane == 0) t = take_ticket(g, m_g);
    t = __shfl_sync(kFullMask, t, 0);
    held_group = -1;
    if (t >= m_g) {
      __syncwarp();  // every lane has read seen[g] before lane 0 writes it
      if (lane == 0) seen[g] |= kAllTaken;
      __syncwarp();
      continue;
    }
    held_ticket = lane == 0 ? take_ticket(g, m_g) : 0u;
    held_group = int(g);
    uint64_t stamp = 0;
    if (lane == 0) {
      stamp = wait_signal_until(peer_signal(sender(g), l.send_stamp_offset(t)),
                                [&](uint64_t value) { return value == epoch; }, c.timeout_ns, c.error,
                                Phase::kDispatchRecv, sender(g));
    }
    __syncwarp();  // lane 0's acquire of the stamp before any lane reads the row
    if (__shfl_sync(kFullMask, stamp, 0) == 0) break;  // timed out (recorded)
    copy_token_to_local_experts(a, transport.peer_address(sender(g), l.send_row_offset(t)), g, t, sender(g),
                                [&](uint32_t le) { return atomicAdd(&state.expert_rows[le], 1u); });
  }

  // Each expert's row count is final once every warp has left its loop, having taken every row it copies: the
  // last block out (one atomic a block, not a warp: fewer to serialize) hands the counts to the caller
  // (out_expert_num_tokens) and to combine (recv_counts). It also hears from the ranks of other dp_ranks, which
  // send us nothing: each must have cleared its combine_done for this round before our combine adds to it (see
  // the top).
  if (last_block_out(state.blocks_done)) {
    for (uint32_t source = threadIdx.x; source < l.world_size; source += blockDim.x) {
      if (source % l.dp_size == c.dp_rank) continue;
      wait_signal_until(peer_signal(int(source), l.send_announce_offset),
                        [&](uint64_t value) { return DispatchEpoch::announced_epoch(value) == epoch; }, c.timeout_ns,
                        c.error, Phase::kDispatchRecv, int32_t(source));
    }
    hand_over_expert_rows(a, state);
  }
}

template <class Transport>
__global__ void __launch_bounds__(kMaxBlockThreads, kMinBlocksPerSm)
    dispatch_pull_kernel(DispatchArgs args, Transport transport) {
  if (args.do_send) dispatch_pull_send(args);
  if (args.do_recv) dispatch_pull_recv(args, transport);
}

// ---------------------------------------------------------------------------------------------------------
// Combine.

// Where the rows the last dispatch delivered start: expert_start[le] is the first of local expert le's rows in
// one running count over all experts, expert_start[num_local_experts] their total (in shared memory, laid out
// as combine_shared_bytes says). Call with the whole block.
__device__ inline const uint32_t* received_row_starts(const RankContext& c) {
  const uint32_t num_local = c.layout.num_local_experts;
  extern __shared__ uint32_t shared[];
  uint32_t* expert_total = shared;
  uint32_t* expert_start = shared + combine_shared_expert_start_word(c.layout);
  const auto* recv_counts = reinterpret_cast<const int32_t*>(c.workspace + c.layout.recv_counts_offset);
  for (uint32_t le = threadIdx.x; le < num_local; le += blockDim.x) expert_total[le] = uint32_t(recv_counts[le]);
  __syncthreads();
  if (warp_id() == 0) warp_exclusive_scan(expert_total, expert_start, num_local);
  __syncthreads();
  return expert_start;
}

template <class T>
struct Vec8;  // eight 16-bit values <-> eight floats

template <>
struct Vec8<__nv_bfloat16> {
  __device__ static void to_float(const int4& raw, float* out) {
    const auto* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(pairs[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
  __device__ static int4 pack(const float* in) {
    int4 raw;
    auto* pairs = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) pairs[i] = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
    return raw;
  }
  __device__ static void store(__nv_bfloat16* dst, const float* in) { *reinterpret_cast<int4*>(dst) = pack(in); }
};

template <>
struct Vec8<__half> {
  __device__ static void to_float(const int4& raw, float* out) {
    const auto* pairs = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(pairs[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
  __device__ static int4 pack(const float* in) {
    int4 raw;
    auto* pairs = reinterpret_cast<__half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) pairs[i] = __floats2half2_rn(in[2 * i], in[2 * i + 1]);
    return raw;
  }
  __device__ static void store(__half* dst, const float* in) { *reinterpret_cast<int4*>(dst) = pack(in); }
};

template <>
struct Vec8<float> {
  __device__ static void store(float* dst, const float* in) {
    reinterpret_cast<float4*>(dst)[0] = make_float4(in[0], in[1], in[2], in[3]);
    reinterpret_cast<float4*>(dst)[1] = make_float4(in[4], in[5], in[6], in[7]);
  }
};

// Warp-wide copy of a float32 row of `elements` values (a multiple of 8) to `dst` as RowT (16-bit): a caller's
// float32 expert_y travels at the 16 bits of the out_tokens its readers write. 2 vectors of 8 values in flight a
// lane (two 16-byte loads each): 4 spilled registers in the pull combine.
template <class RowT>
__device__ __forceinline__ void warp_copy_floats_as(uint8_t* dst, const float* src, uint64_t elements) {
  constexpr int kUnroll = 2;
  const uint64_t vectors = elements / 8;
  const auto* s = reinterpret_cast<const int4*>(src);
  auto* d = reinterpret_cast<int4*>(dst);
  for (uint64_t pass = 0; pass < vectors; pass += kUnroll * kWarpSize) {
    int4 raw[kUnroll][2];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint64_t v = pass + lane_id() + u * kWarpSize;
      if (v < vectors) {
        raw[u][0] = load_stream(s + 2 * v);
        raw[u][1] = load_stream(s + 2 * v + 1);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint64_t v = pass + lane_id() + u * kWarpSize;
      if (v < vectors) d[v] = Vec8<RowT>::pack(reinterpret_cast<const float*>(raw[u]));
    }
  }
}

// Writes each row i of expert_y[le] (SourceT: ExpertT, or float32 to send as ExpertT) to row (token, k) of
// combine_recv of every rank of its source group, a row per warp, and flushes the puts. Call with the whole
// block.
template <class ExpertT, class SourceT, class Transport>
__device__ void push_rows_to_sources(const CombineArgs& a, const Transport& transport) {
  const RankContext& c = a.ctx;
  const BufferLayout& l = c.layout;
  const uint32_t num_local = l.num_local_experts;
  const uint32_t* expert_start = received_row_starts(c);

  const auto* routes = reinterpret_cast<const TokenRoute*>(c.workspace + l.routes_offset);
  uint8_t* staging = c.symmetric + l.staging_row_offset(global_warp());
  // Rows the experts wrote into expert_outputs are in the symmetric buffer already: puts send them from there
  // (128 tokens through puts, 8 ranks on one H200: 176 µs instead of 200, medians).
  constexpr bool kConverts = !std::is_same_v<SourceT, ExpertT>;  // float32 rows (never in expert_outputs)
  const bool y_is_symmetric = !kConverts && a.expert_y == c.symmetric + l.expert_outputs_offset;
  const uint32_t total = expert_start[num_local];
  for (uint32_t j = global_warp(); j < total; j += total_warps()) {
    const uint32_t le = find_segment(expert_start, num_local, j);
    const uint64_t row = uint64_t(le) * l.max_recv_tokens + (j - expert_start[le]);
    const TokenRoute route = routes[row];
    const uint8_t* y = a.expert_y + row * (kConverts ? uint64_t(l.hidden_dim) * sizeof(float) : l.combine_row_bytes);
    const uint64_t offset = l.combine_row_offset(route.token, route.k);
    bool staged = y_is_symmetric;
    uint8_t* put_source = y_is_symmetric ? const_cast<uint8_t*>(y) : staging;  // written only when !staged
    for (uint32_t d = 0; d < l.dp_size; ++d) {
      const int peer = int(route.source_group * l.dp_size + d);
      deliver_row(transport, peer, offset, l.combine_row_bytes, put_source, staged, [&](uint8_t* dst) {
        if constexpr (kConverts) {
          warp_copy_floats_as<ExpertT>(dst, reinterpret_cast<const float*>(y), l.hidden_dim);
        } else {
          warp_copy_16<SourceKind::kInput>(dst, y, l.combine_row_bytes);
        }
      });
    }
  }
  transport.flush_warp();
}

// Where a rank's combine rows are for their readers.
enum CombineRowsAt : uint32_t {
  kRowsInOwnerBuffer = 0,  // the owner's expert_outputs, at the slot the pull dispatch recorded (pull combine)
  kRowsPushed = 1,         // the reader's own combine_recv[token][k]
};

// The ScalarType of rows of RowT, which travel at 16 bits.
template <class RowT>
__device__ constexpr ScalarType row_type_of() {
  static_assert(std::is_same_v<RowT, __nv_bfloat16> || std::is_same_v<RowT, __half>, "rows travel at 16 bits");
  return std::is_same_v<RowT, __half> ? ScalarType::kFloat16 : ScalarType::kBFloat16;
}

// What a rank's combine_done arrival tells its readers (the payload of its ArrivalSignal): where its rows are
// (bit 0) and the 16-bit type they travel as (the bits above). Each rank passes its own expert_y, so the types
// may differ by mistake, and a reader that summed another type's bits would return garbage: it refuses.
struct CombineArrival {
  __device__ static constexpr uint32_t payload(CombineRowsAt at, ScalarType row_type) {
    return uint32_t(at) | (uint32_t(row_type) << 1);
  }
  __device__ static constexpr CombineRowsAt rows_at(uint32_t payload) { return CombineRowsAt(payload & 1u); }
  __device__ static constexpr ScalarType row_type(uint32_t payload) { return ScalarType(payload >> 1); }
};

template <class ExpertT, class SourceT, class Transport>
__device__ void combine_send(const CombineArgs& a, const Transport& transport) {
  push_rows_to_sources<ExpertT, SourceT>(a, transport);
  announce_block_arrival(a.ctx, transport, a.ctx.layout.combine_done_offset_of(a.ctx.rank),
                         CombineArrival::payload(kRowsPushed, row_type_of<ExpertT>()));
}

// out[t] = sum_k weights[t][k] * row(t, k) for the first bound_m tokens, in fp32, written as OutT. `row_of(t, k,
// expert)` gives the address of the expert output row of (t, k) for a valid expert; it may take dependent
// loads (a slot read from a peer). A work item is a run of chunks (32 vectors of 8 elements, one per lane) of
// one token; runs are as long as keeps about kItemsPerWarp items per warp, so every warp has work. A warp looks
// up the rows of 32 / top_k of its items at once, lane i row i % top_k of item i / top_k, into its row table:
// one round trip of index, weight and slot loads for all of them, not one per item. Then every lane loads its
// vector of eight rows before summing any. Sums stay in k order, as the reference's. kWide: top_k > 32, whose
// rows a table holds a pass of 32 at a time (weighted_sum_rows picks; apart, neither spills registers).
template <bool kWide, class OutT, class ExpertT, class RowOf>
__device__ __forceinline__ void weighted_sum_rows_of(const CombineArgs& a, RowOf row_of) {
  const RankContext& c = a.ctx;
  const BufferLayout& l = c.layout;
  const uint32_t m = read_bound_m(a.bound_m, a.m, c.error, Phase::kCombineRecv);
  const uint32_t top_k = l.experts_per_token;
  const uint32_t vectors = l.hidden_dim / 8;
  auto* out = static_cast<OutT*>(a.out_tokens);
  constexpr uint32_t kBatch = 8;
  constexpr uint32_t kItemsPerWarp = 4;
  __shared__ const int4* row_table[kMaxBlockThreads / kWarpSize][kWarpSize];
  __shared__ float weight_table[kMaxBlockThreads / kWarpSize][kWarpSize];
  const int4** table_rows = row_table[warp_id()];
  float* table_weights = weight_table[warp_id()];

  const uint32_t chunks = (vectors + kWarpSize - 1) / kWarpSize;
  const uint32_t warps = uint32_t(total_warps());
  // Wide rows look up every pass of 32 again: one item a table, one chunk an item. Work items are counted in 32
  // bits (AllToAllConfig::validate bounds max_num_tokens * chunks).
  const uint32_t balanced_run = (m * chunks + kItemsPerWarp * warps - 1) / (kItemsPerWarp * warps);
  const uint32_t run = kWide ? 1u : balanced_run < 1 ? 1u : balanced_run > chunks ? chunks : balanced_run;
  const uint32_t runs_per_token = (chunks + run - 1) / run;
  const uint32_t items = m * runs_per_token;
  const uint32_t items_per_table = kWide ? 1u : kWarpSize / top_k;
  const int lane = lane_id();
  // Lane `lane` looks up row k of `item` (any lane past the items, or past top_k, writes an empty entry).
  auto fill_table = [&](uint32_t item, uint32_t k, bool valid) {
    __syncwarp();  // every lane is done with the last table
    const int4* row = nullptr;
    float weight = 0.0f;
    if (valid && item < items && k < top_k) {
      const uint32_t t = item / runs_per_token;
      const uint32_t expert = a.indices[uint64_t(t) * top_k + k];
      // Rows of invalid experts were never sent (dispatch reported them): they add nothing.
      if (expert < l.num_experts) {
        row = row_of(t, k, expert);
        weight = a.weights[uint64_t(t) * top_k + k];
      }
    }
    table_rows[lane] = row;
    table_weights[lane] = weight;
    __syncwarp();
  };
  for (uint32_t first_item = global_warp(); first_item < items; first_item += warps * items_per_table) {
    const uint32_t lane_item = uint32_t(lane) / top_k;
    if (!kWide) fill_table(first_item + lane_item * warps, uint32_t(lane) % top_k, lane_item < items_per_table);
    for (uint32_t j = 0; j < items_per_table; ++j) {
      const uint32_t item = first_item + j * warps;
      if (item >= items) break;
      const uint32_t t = item / runs_per_token;
      const uint32_t first_chunk = item % runs_per_token * run;
      const uint32_t end_chunk = min(chunks, first_chunk + run);
      const int4* const* rows = table_rows + j * top_k;  // j is 0 for wide rows (a table per item)
      const float* weights_of_k = table_weights + j * top_k;
      for (uint32_t chunk = first_chunk; chunk < end_chunk; ++chunk) {
        const uint32_t v = chunk * kWarpSize + lane;
        float acc[8] = {};
        for (uint32_t k0 = 0; k0 < top_k; k0 += kWarpSize) {
          if (kWide) fill_table(item, k0 + uint32_t(lane), true);
          if (v >= vectors) continue;
          const uint32_t pass = min(uint32_t(kWarpSize), top_k - k0);
          for (uint32_t k1 = 0; k1 < pass; k1 += kBatch) {
            int4 raw[kBatch];
#pragma unroll
            for (uint32_t u = 0; u < kBatch; ++u) {
              raw[u] = k1 + u < pass && rows[k1 + u] != nullptr ? rows[k1 + u][v] : int4{0, 0, 0, 0};
            }
#pragma unroll
            for (uint32_t u = 0; u < kBatch; ++u) {
              if (k1 + u >= pass || rows[k1 + u] == nullptr) continue;
              float y[8];
              Vec8<ExpertT>::to_float(raw[u], y);
              const float w = weights_of_k[k1 + u];
#pragma unroll
              for (int e = 0; e < 8; ++e) acc[e] += w * y[e];
            }
          }
        }
        if (v < vectors) Vec8<OutT>::store(out + uint64_t(t) * l.hidden_dim + uint64_t(v) * 8, acc);
      }
    }
  }
}

template <class OutT, class ExpertT, class RowOf>
__device__ __forceinline__ void weighted_sum_rows(const CombineArgs& a, RowOf row_of) {
  if (a.ctx.layout.experts_per_token > kWarpSize) {
    weighted_sum_rows_of<true, OutT, ExpertT>(a, row_of);
  } else {
    weighted_sum_rows_of<false, OutT, ExpertT>(a, row_of);
  }
}

// Waits until every rank has announced its combine rows (they are where this rank's reduction reads them).
// With `pushed_bits` (shared memory, a bit per rank) also notes which ranks pushed them (CombineRowsAt). Returns
// whether every rank's rows travel as `row_type`, the type this rank sums; else the error is recorded (the
// first other rank the block saw) and the caller writes nothing. Call with the whole block.
__device__ inline bool wait_combine_done(const RankContext& c, ScalarType row_type, uint32_t* pushed_bits = nullptr) {
  const uint32_t world = c.layout.world_size;
  if (pushed_bits != nullptr) {
    for (uint32_t w = threadIdx.x; w < rank_bit_words(c.layout); w += blockDim.x) pushed_bits[w] = 0;
    __syncthreads();
  }
  bool mismatch = false;
  for (uint32_t peer = threadIdx.x; peer < world; peer += blockDim.x) {
    const uint64_t arrival = wait_arrivals(c.local_signal(c.layout.combine_done_offset_of(peer)), c.timeout_ns,
                                           c.error, Phase::kCombineRecv, int32_t(peer));
    if (arrival == 0) continue;  // timed out (recorded)
    const uint32_t payload = ArrivalSignal::payload(arrival);
    if (CombineArrival::row_type(payload) != row_type) {
      record_error(c.error, ErrorCode::kRowTypeMismatch, Phase::kCombineRecv, int32_t(peer),
                   RowTypeMismatch::value(CombineArrival::row_type(payload), row_type));
      mismatch = true;
    }
    if (pushed_bits != nullptr && CombineArrival::rows_at(payload) == kRowsPushed) {
      atomicOr(&pushed_bits[peer / 32], 1u << (peer % 32));
    }
  }
  return __syncthreads_or(mismatch) == 0;
}

template <class OutT, class ExpertT>
__device__ void combine_recv(const CombineArgs& a) {
  const RankContext& c = a.ctx;
  if (!wait_combine_done(c, row_type_of<ExpertT>())) return;
  weighted_sum_rows<OutT, ExpertT>(a, [&](uint32_t t, uint32_t k, uint32_t) {
    return reinterpret_cast<const int4*>(c.symmetric + c.layout.combine_row_offset(t, k));
  });
}

template <class Transport, class OutT, class ExpertT, class SourceT>
__global__ void __launch_bounds__(kMaxBlockThreads, kMinBlocksPerSm)
    combine_kernel(CombineArgs args, Transport transport) {
  if (args.do_send) combine_send<ExpertT, SourceT>(args, transport);
  if (args.do_recv) combine_recv<OutT, ExpertT>(args);
}

// ---------------------------------------------------------------------------------------------------------
// Pull combine.

// A transport seen by a kernel that runs only when every peer is mapped: without its put path, which the
// compiler would otherwise keep (with NVSHMEM it made the pull combine spill registers).
template <class Transport>
struct MappedPeers {
  static constexpr bool kMayPut = false;
  const Transport& transport;
  __device__ uint8_t* peer_address(int pe, uint64_t offset) const { return transport.peer_address(pe, offset); }
  __device__ void flush_warp() const { __syncwarp(); }
};

template <class ExpertT, class SourceT, class Transport>
__device__ void combine_pull_send(const CombineArgs& a, const Transport& transport) {
  const RankContext& c = a.ctx;
  const BufferLayout& l = c.layout;
  if (blockIdx.x == 0) {
    // The pull dispatch's receive state and epoch, for dispatch n+1 (this rank's dispatch n has ended). Its
    // expert_rows were zeroed when the receive handed them over.
    auto* pull_state = reinterpret_cast<uint32_t*>(c.workspace + l.pull_state_offset);
    for (uint64_t i = l.num_local_experts + threadIdx.x; i < l.pull_state_words(); i += blockDim.x) pull_state[i] = 0;
    if (threadIdx.x == 0) *c.dispatch_epoch_counter() = DispatchEpoch::advance(*c.dispatch_epoch_counter());
  }
  // The caller's expert_y is readable only here: its rows are pushed to their readers. Measured at 128 tokens
  // against copying them into expert_outputs for the readers to pull: 4 µs faster with 8 ranks on one H200,
  // 4.6 µs (11 %) with 2 ranks on two H200s over NVLink (docs/performance.md).
  const bool push = !std::is_same_v<SourceT, ExpertT> || a.expert_y != c.symmetric + l.expert_outputs_offset;
  if (push) push_rows_to_sources<ExpertT, SourceT>(a, MappedPeers<Transport>{transport});
  announce_block_arrival(c, transport, l.combine_done_offset_of(c.rank),
                         CombineArrival::payload(push ? kRowsPushed : kRowsInOwnerBuffer, row_type_of<ExpertT>()));
}

template <class Transport, class OutT, class ExpertT>
__device__ void combine_pull_recv(const CombineArgs& a, const Transport& transport) {
  const RankContext& c = a.ctx;
  const BufferLayout& l = c.layout;
  extern __shared__ uint32_t shared[];
  uint32_t* pushed_bits = shared + combine_shared_rank_bits_word(l);
  if (!wait_combine_done(c, row_type_of<ExpertT>(), pushed_bits)) return;
  weighted_sum_rows<OutT, ExpertT>(a, [&](uint32_t t, uint32_t k, uint32_t expert) {
    const uint32_t owner = expert / l.num_local_experts;
    if ((pushed_bits[owner / 32] >> (owner % 32)) & 1u) {
      return reinterpret_cast<const int4*>(c.symmetric + l.combine_row_offset(t, k));
    }
    const uint32_t slot = *reinterpret_cast<const uint32_t*>(
        transport.peer_address(int(owner), l.combine_slot_offset(c.dp_group, t, k)));
    // A slot the owner never wrote (a repeated expert, which dispatch reported) still reads inside the buffer.
    const uint32_t row = min(slot, l.max_recv_tokens - 1);
    return reinterpret_cast<const int4*>(
        transport.peer_address(int(owner), l.expert_output_offset(expert % l.num_local_experts, row)));
  });
}

template <class Transport, class OutT, class ExpertT, class SourceT>
__global__ void __launch_bounds__(kMaxBlockThreads, kMinBlocksPerSm)
    combine_pull_kernel(CombineArgs args, Transport transport) {
  if (args.do_send) combine_pull_send<ExpertT, SourceT>(args, transport);
  if (args.do_recv) combine_pull_recv<Transport, OutT, ExpertT>(args, transport);
}

// ---------------------------------------------------------------------------------------------------------
// Launchers, instantiated by each transport's translation unit.

// The pull dispatch when every peer's buffer is load/store reachable (receivers copy tokens straight from
// senders), else the push dispatch.
template <class Transport>
void launch_dispatch(const DispatchArgs& args, const Transport& transport, LaunchShape shape, cudaStream_t stream) {
  if (transport.load_store_only()) {
    const uint64_t shared_bytes = pull_dispatch_shared_bytes(args.ctx.layout, shape.threads);
    EW_REQUIRE(shared_bytes <= kMaxDefaultSharedBytes, "dispatch: ", args.ctx.layout.num_dp_groups,
               " DP groups need ", shared_bytes, " bytes of shared memory per block (at most ", kMaxDefaultSharedBytes,
               "); use fewer threads per block (EXPERTWIRE_BLOCK_THREADS)");
    dispatch_pull_kernel<Transport><<<shape.blocks, shape.threads, shared_bytes, stream>>>(args, transport);
  } else if constexpr (Transport::kMayPut) {
    dispatch_kernel<Transport>
        <<<shape.blocks, shape.threads, push_dispatch_shared_bytes(args.ctx.layout), stream>>>(args, transport);
  }
  EW_CUDA_CHECK(cudaGetLastError());
}

// The pull combine when every peer's buffer is load/store reachable, else the push combine. Rows travel and are
// summed as ExpertT; expert_y holds SourceT (ExpertT, or float32).
template <class Transport, class OutT, class ExpertT, class SourceT = ExpertT>
void launch_combine_typed(const CombineArgs& args, const Transport& transport, LaunchShape shape,
                          cudaStream_t stream) {
  const uint64_t shared_bytes = combine_shared_bytes(args.ctx.layout);
  if (transport.load_store_only()) {
    combine_pull_kernel<Transport, OutT, ExpertT, SourceT>
        <<<shape.blocks, shape.threads, shared_bytes, stream>>>(args, transport);
  } else if constexpr (Transport::kMayPut) {
    combine_kernel<Transport, OutT, ExpertT, SourceT>
        <<<shape.blocks, shape.threads, shared_bytes, stream>>>(args, transport);
  }
  EW_CUDA_CHECK(cudaGetLastError());
}

template <class Transport, class ExpertT>
void launch_combine_for_expert(const CombineArgs& args, const Transport& transport, ScalarType out_type,
                               LaunchShape shape, cudaStream_t stream) {
  switch (out_type) {
    case ScalarType::kFloat32: return launch_combine_typed<Transport, float, ExpertT>(args, transport, shape, stream);
    case ScalarType::kBFloat16:
      return launch_combine_typed<Transport, __nv_bfloat16, ExpertT>(args, transport, shape, stream);
    case ScalarType::kFloat16: return launch_combine_typed<Transport, __half, ExpertT>(args, transport, shape, stream);
  }
  EW_THROW(ConfigError, "combine: unsupported out_tokens type ", int(out_type));
}

template <class Transport>
void launch_combine(const CombineArgs& args, const Transport& transport, ScalarType out_type,
                    ScalarType expert_type, LaunchShape shape, cudaStream_t stream) {
  switch (expert_type) {
    case ScalarType::kBFloat16:
      return launch_combine_for_expert<Transport, __nv_bfloat16>(args, transport, out_type, shape, stream);
    case ScalarType::kFloat16:
      return launch_combine_for_expert<Transport, __half>(args, transport, out_type, shape, stream);
    case ScalarType::kFloat32:  // rows travel as out_tokens' 16-bit type (AllToAll::combine checks it is one)
      if (out_type == ScalarType::kBFloat16) {
        return launch_combine_typed<Transport, __nv_bfloat16, __nv_bfloat16, float>(args, transport, shape, stream);
      }
      if (out_type == ScalarType::kFloat16) {
        return launch_combine_typed<Transport, __half, __half, float>(args, transport, shape, stream);
      }
      break;
  }
  EW_THROW(ConfigError, "combine: unsupported expert_y / out_tokens types ", scalar_type_name(expert_type), " / ",
           scalar_type_name(out_type));
}

}  // namespace expertwire::device
