// The route kernel of the count exchange (device/ht_route.cuh says what it does), compiled once for both
// transports: it touches no peer.
#include "device/ht_route.cuh"

namespace expertwire::device {

__global__ void __launch_bounds__(kRouteBlockTokens) ht_route_kernel(HtArgs a) {
  const HtLayout& l = a.l;
  const uint32_t k = l.experts_per_token, counters = l.world_size + l.num_experts;
  extern __shared__ uint32_t route_shared[];
  uint32_t* warp_counts = route_shared;                                                 // [warps][counters]
  int32_t* experts = reinterpret_cast<int32_t*>(warp_counts + kRouteWarps * counters);  // [tokens][k]
  int32_t* rank_place = experts + kRouteBlockTokens * k;                                // [tokens][k]
  int32_t* expert_place = rank_place + kRouteBlockTokens * k;                           // [tokens][k]
  float* weights = reinterpret_cast<float*>(expert_place + kRouteBlockTokens * k);      // [tokens][k]
  for (uint32_t i = threadIdx.x; i < kRouteWarps * counters; i += blockDim.x) warp_counts[i] = 0;

  // The block's experts and weights, read by all its threads together: coalesced, and no global store between the
  // loads.
  const uint32_t first = blockIdx.x * kRouteBlockTokens;
  const uint32_t block_slots = min(kRouteBlockTokens, a.m - first) * k;
  for (uint32_t i = threadIdx.x; i < block_slots; i += blockDim.x) {
    const uint64_t at = uint64_t(first) * k + i;
    int64_t e =
        a.topk_idx_int64 ? static_cast<const int64_t*>(a.topk_idx)[at] : static_cast<const int32_t*>(a.topk_idx)[at];
    if (e < -1 || e >= int64_t(l.num_experts)) {
      record_error(a.error, ErrorCode::kBadExpertIndex, Phase::kDispatchSend, -1, e);
      e = -1;
    }
    experts[i] = int32_t(e);
    weights[i] = a.topk_weights[at];
  }
  __syncthreads();

  const uint32_t t = first + threadIdx.x;
  const bool valid = t < a.m;
  int32_t* own = experts + threadIdx.x * k;
  uint64_t ranks = 0;
  for (uint32_t j = 0; j < k; ++j) {
    int32_t e = valid ? own[j] : -1;
    for (uint32_t j2 = 0; j2 < j && e >= 0; ++j2) {
      if (own[j2] == e) {
        record_error(a.error, ErrorCode::kRepeatedExpert, Phase::kDispatchSend, -1, e);
        e = -1;
      }
    }
    own[j] = e;
    if (e >= 0) ranks |= 1ull << (uint32_t(e) / l.num_local_experts);
  }
  __syncthreads();

  // In-warp places: ballots for ranks, masks of lanes for experts.
  const int lane = lane_id(), warp = warp_id();
  const unsigned earlier = (1u << lane) - 1;
  uint32_t* counts = warp_counts + warp * counters;
  for (uint32_t j = 0; j < k; ++j) rank_place[threadIdx.x * k + j] = -1;
  for (uint32_t r = 0; r < l.world_size; ++r) {
    const unsigned has = __ballot_sync(kFullMask, (ranks >> r) & 1);
    if (lane == 0) counts[r] = __popc(has);
    if (((ranks >> r) & 1) == 0) continue;
    for (uint32_t j = 0; j < k; ++j) {  // the first slot naming r
      if (own[j] >= 0 && uint32_t(own[j]) / l.num_local_experts == r) {
        rank_place[threadIdx.x * k + j] = __popc(has & earlier);
        break;
      }
    }
  }
  // An expert's counter holds the mask of the warp's lanes that name it (a token names an expert once) until its
  // places are read, then its count.
  uint32_t* expert_lanes = counts + l.world_size;
  for (uint32_t j = 0; j < k; ++j) {
    if (own[j] >= 0) atomicOr(&expert_lanes[own[j]], 1u << lane);
  }
  __syncwarp();
  for (uint32_t j = 0; j < k; ++j) {
    expert_place[threadIdx.x * k + j] = own[j] < 0 ? -1 : __popc(expert_lanes[own[j]] & earlier);
  }
  __syncwarp();
  for (uint32_t e = lane; e < l.num_experts; e += kWarpSize) expert_lanes[e] = __popc(expert_lanes[e]);
  __syncthreads();

  // Warps' counts become their first places in the block; the block's totals go to the handle.
  for (uint32_t c = threadIdx.x; c < counters; c += blockDim.x) {
    uint32_t running = 0;
    for (uint32_t w = 0; w < kRouteWarps; ++w) {
      const uint32_t v = warp_counts[w * counters + c];
      warp_counts[w * counters + c] = running;
      running += v;
    }
    a.h.block_counts[uint64_t(blockIdx.x) * counters + c] = running;
  }
  __syncthreads();
  if (!valid) return;
  uint8_t* record = a.local<uint8_t>(l.token_record_offset(t));
  for (uint32_t j = 0; j < k; ++j) {
    const int32_t e = own[j];
    int32_t rank_row = rank_place[threadIdx.x * k + j], expert_row = -1;
    if (rank_row >= 0) rank_row += int32_t(counts[uint32_t(e) / l.num_local_experts]);
    if (e >= 0) expert_row = expert_place[threadIdx.x * k + j] + int32_t(counts[l.world_size + uint32_t(e)]);
    a.h.slot_rank_row[uint64_t(t) * k + j] = rank_row;  // places in the block; publish adds the earlier blocks
    a.h.slot_expert_row[uint64_t(t) * k + j] = expert_row;
    a.h.slot_dest[uint64_t(t) * k + j] = e >= 0 ? int32_t(uint32_t(e) / l.num_local_experts) : -1;
    record_words(record, k, kRecordExpert)[j] = e;
    reinterpret_cast<float*>(record_words(record, k, kRecordWeight))[j] = e >= 0 ? weights[threadIdx.x * k + j] : 0.0f;
  }
}

}  // namespace expertwire::device
