// The push combine, for transports where some peer is reachable only by puts: every expert row goes back to
// row (token, k) of combine_recv of each rank of its token's group, which sums them (wire_protocol.h).
#pragma once

#include <cuda_runtime.h>

#include "device/combine_rows.cuh"
#include "device/kernel_args.h"
#include "device/weighted_sum.cuh"

namespace expertwire::device {

template <class ExpertT, class SourceT, class Transport>
__device__ void combine_push_send(const CombineArgs& a, const Transport& transport) {
  push_rows_to_sources<ExpertT, SourceT>(a, transport);
  announce_combine_rows<ExpertT>(a, transport, kRowsPushed);
}

template <class OutT, class ExpertT, class Transport>
__device__ void combine_push_recv(const CombineArgs& a, const Transport& transport) {
  const RankContext& c = a.ctx;
  if (!wait_combine_done(c, transport, row_type_of<ExpertT>())) return;
  weighted_sum_rows<OutT, ExpertT>(a, [&](uint32_t t, uint32_t k, uint32_t expert) -> const int4* {
    // The fault-tolerant mode leaves lost ranks' experts out.
    if (is_lost(transport, c, expert / c.layout.num_local_experts)) return nullptr;
    return reinterpret_cast<const int4*>(c.local(c.combine_row(t, k)));
  });
}

template <class Transport, class OutT, class ExpertT, class SourceT>
__global__ void __launch_bounds__(kMaxBlockThreads, kMinBlocksPerSm)
    combine_push_kernel(CombineArgs args, Transport transport) {
  if (args.do_send && (!Transport::kFaultTolerant || still_serving(args.ctx, Phase::kCombineSend))) {
    combine_push_send<ExpertT, SourceT>(args, transport);
  }
  if (args.do_recv) combine_push_recv<OutT, ExpertT>(args, transport);
}

}  // namespace expertwire::device
