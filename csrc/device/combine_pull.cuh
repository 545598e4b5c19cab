// The pull combine, when every peer's buffer is load/store reachable: experts that wrote their outputs into
// expert_outputs move nothing, and each token's rank reads its rows straight from the owners' buffers, at the
// slots the pull dispatch recorded; a caller's expert_y, which no peer can read, is pushed (wire_protocol.h).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "device/combine_rows.cuh"
#include "device/kernel_args.h"
#include "device/weighted_sum.cuh"

namespace expertwire::device {

// A transport seen by a kernel that runs only when every peer is mapped: without its put path, which the
// compiler would otherwise keep (with NVSHMEM it made the pull combine spill registers).
template <class Transport>
struct MappedPeers {
  static constexpr bool kMayPut = false;
  static constexpr bool kFaultTolerant = Transport::kFaultTolerant;
  const Transport& transport;
  template <class T>
  __device__ T* peer(int pe, SymmetricRef<T> ref) const {
    return transport.peer(pe, ref);
  }
  __device__ void flush_warp(bool) const { __syncwarp(); }
};

template <class ExpertT, class SourceT, class Transport>
__device__ void combine_pull_send(const CombineArgs& a, const Transport& transport) {
  finish_pull_dispatch(a.ctx);
  // The caller's expert_y is readable only here: its rows are pushed to their readers, which measured faster
  // than copying them into expert_outputs for the readers to pull (docs/performance.md).
  const bool push = !std::is_same_v<SourceT, ExpertT> || !expert_y_in_buffer(a);
  if (push) push_rows_to_sources<ExpertT, SourceT>(a, MappedPeers<Transport>{transport});
  announce_combine_rows<ExpertT>(a, transport, push ? kRowsPushed : kRowsInOwnerBuffer);
}

template <class Transport, class OutT, class ExpertT>
__device__ void combine_pull_recv(const CombineArgs& a, const Transport& transport) {
  const RankContext& c = a.ctx;
  const BufferLayout& l = c.layout;
  extern __shared__ uint32_t shared[];
  uint32_t* pushed_bits = shared + CombineShared::rank_bits_word(l);
  if (!wait_combine_done(c, transport, row_type_of<ExpertT>(), pushed_bits)) return;
  weighted_sum_rows<OutT, ExpertT>(a, [&](uint32_t t, uint32_t k, uint32_t expert) -> const int4* {
    const uint32_t owner = expert / l.num_local_experts;
    if (is_lost(transport, c, owner)) return nullptr;  // the fault-tolerant mode leaves its experts out
    if ((pushed_bits[owner / 32] >> (owner % 32)) & 1u) {
      return reinterpret_cast<const int4*>(c.local(c.combine_row(t, k)));
    }
    const uint32_t slot = *transport.peer(int(owner), c.combine_slot(c.dp_group, t, k));
    // A slot the owner never wrote (a repeated expert, which dispatch reported) still reads inside the buffer.
    const uint32_t row = min(slot, l.max_recv_tokens - 1);
    return reinterpret_cast<const int4*>(
        transport.peer(int(owner), c.expert_output(expert % l.num_local_experts, row)));
  });
}

template <class Transport, class OutT, class ExpertT, class SourceT>
__global__ void __launch_bounds__(kMaxBlockThreads, kMinBlocksPerSm)
    combine_pull_kernel(CombineArgs args, Transport transport) {
  if (args.do_send && (!Transport::kFaultTolerant || still_serving(args.ctx, Phase::kCombineSend))) {
    combine_pull_send<ExpertT, SourceT>(args, transport);
  }
  if (args.do_recv) combine_pull_recv<Transport, OutT, ExpertT>(args, transport);
}

}  // namespace expertwire::device
