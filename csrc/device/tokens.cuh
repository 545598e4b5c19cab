// Token rows, as both dispatch forms write and receive them: a DispatchToken (core/layout.h) is a header (the
// source token and its experts), the payload and the scales.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "device/expert_row.cuh"
#include "device/fp8_cast.cuh"
#include "device/kernel_args.h"
#include "device/primitives.cuh"

namespace expertwire::device {

// Writes one DispatchToken at `dst` with the whole warp; the payload and the scales only when `copy_payload`
// and `copy_scales` (false: the caller wrote them at dst itself). `x_scale`: the token's row of dp_x_scale, whose
// words lie `scale_word_stride` bytes apart. With a `cast`, x is the token's bf16 row and the payload and scales
// are its fp8 cast (x_scale unused).
__device__ __forceinline__ void write_dispatch_token(uint8_t* dst, const BufferLayout& l, uint32_t token,
                                                     const ExpertRow& experts, const uint8_t* x, const uint8_t* x_scale,
                                                     uint64_t scale_word_stride, bool copy_payload = true,
                                                     bool copy_scales = true, Fp8Cast cast = Fp8Cast::kNone) {
  auto* header = reinterpret_cast<uint32_t*>(dst);
  for (uint32_t w = lane_id(); w <= l.experts_per_token; w += kWarpSize) {
    header[w] = w == 0 ? token : experts[w - 1];
  }
  if (cast != Fp8Cast::kNone) {
    warp_cast_fp8_row(dst + l.payload_offset_in_token(), dst + l.scale_offset_in_token(), x, l.hidden_dim, cast);
    return;
  }
  if (copy_payload) warp_copy_16<SourceKind::kInput>(dst + l.payload_offset_in_token(), x, l.hidden_dim_bytes);
  if (copy_scales && l.hidden_dim_scale_bytes != 0) {
    warp_copy_4_strided_to_lanes(x_scale, scale_word_stride, l.hidden_dim_scale_bytes / 4, 1u, 4,
                                 [dst, &l](int) { return dst + l.scale_offset_in_token(); });
  }
}

// Token t's row of dp_x and of dp_x_scale, as bytes.
__device__ __forceinline__ const uint8_t* input_payload(const DispatchArgs& a, uint32_t t) { return a.dp_x.at(t, 0); }
__device__ __forceinline__ const uint8_t* input_scales(const DispatchArgs& a, uint32_t t) {
  return reinterpret_cast<const uint8_t*>(a.dp_x_scale.at(t, 0));
}

// The rank that owns `expert`, or ~0u (no rank) for an index out of range.
__device__ __forceinline__ uint32_t owner_of(const BufferLayout& l, uint32_t expert) {
  return expert < l.num_experts ? expert / l.num_local_experts : ~0u;
}

// Whether `key` = key_of(experts[k0 + lane]) is the first of its value in the token's row (an ExpertRow, or a
// received token's experts), for the whole warp, every lane holding its own: the lanes of this chunk are compared
// in registers, only earlier chunks (top_k > 32) are read again.
template <class Row, class KeyOf>
__device__ __forceinline__ bool first_in_row(const Row& experts, uint32_t k0, uint32_t key, KeyOf key_of) {
  const unsigned same = __match_any_sync(kFullMask, key);
  bool first = (same & ((1u << lane_id()) - 1u)) == 0;
  for (uint32_t j = 0; j < k0 && first; ++j) first = key_of(experts[j]) != key;
  return first;
}

// A token's row may repeat an expert only by mistake; the dispatch delivers such a token once, to the first k
// that names the expert, and the sender reports it. Whether experts[k0 + lane] (`expert`) is the first of its
// value (see first_in_row).
template <class Row>
__device__ __forceinline__ bool first_in_warp_chunk(const Row& experts, uint32_t k0, uint32_t expert) {
  return first_in_row(experts, k0, expert, [](uint32_t e) { return e; });
}

// Records what is wrong with `expert` = experts[k0 + lane] of a token's row (`in_row`: k0 + lane < top_k): an
// index out of range (never sent) or an expert the row repeats (sent once). kNoExpert, in any number of slots,
// is neither. Call with the whole warp.
__device__ __forceinline__ void check_row_expert(const RankContext& c, const ExpertRow& experts, uint32_t k0,
                                                 uint32_t expert, bool in_row) {
  const bool first = first_in_warp_chunk(experts, k0, expert);
  if (!in_row || expert == kNoExpert) return;
  if (expert >= c.layout.num_experts) {
    record_error(c.error, ErrorCode::kBadExpertIndex, Phase::kDispatchSend, -1, experts.written(k0 + lane_id()));
  } else if (!first) {
    record_error(c.error, ErrorCode::kRepeatedExpert, Phase::kDispatchSend, -1, expert);
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
    const Strided3D<float>& scales = a.out_expert_x_scale;
    warp_copy_4_strided_to_lanes(
        token + l.scale_offset_in_token(), 4, l.hidden_dim_scale_bytes / 4, lanes, scales.element_stride,
        [&](int lane) {
          const uint32_t lane_expert = __shfl_sync(kFullMask, local_expert, lane);
          return reinterpret_cast<uint8_t*>(scales.at(lane_expert, __shfl_sync(kFullMask, row, lane), 0));
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
  TokenRoute* routes = c.routes();
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
        // For the pull combine; its readers start after this kernel has ended (rank_state.h).
        *c.local(c.combine_slot(g, t, k)) = row;
      }
    }
    copy_to_expert_rows(a, token, __ballot_sync(kFullMask, mine), expert - first_expert, row);
  }
}

}  // namespace expertwire::device
