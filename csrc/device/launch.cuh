// Host launchers of the four kernels, with the dtype switches that pick their instantiations. Each transport's
// translation unit includes this with its own Transport and instantiates them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "core/cuda_utils.h"
#include "core/error.h"
#include "device/combine_pull.cuh"
#include "device/combine_push.cuh"
#include "device/dispatch_pull.cuh"
#include "device/dispatch_push.cuh"
#include "device/kernel_args.h"
#include "device/wire_protocol.h"
#include "expertwire/all_to_all.h"

namespace expertwire::device {

// The pull dispatch when every peer's buffer is load/store reachable (receivers copy tokens straight from
// senders), else the push dispatch; each in the object's mode (InMode).
template <class Transport>
void launch_dispatch_in_mode(const DispatchArgs& args, const Transport& transport, LaunchShape shape,
                             cudaStream_t stream) {
  if (transport.load_store_only()) {
    const uint64_t shared_bytes = PullDispatchShared::bytes(args.ctx.layout, shape.threads);
    EW_REQUIRE(shared_bytes <= kMaxDefaultSharedBytes, "dispatch: ", args.ctx.layout.num_dp_groups, " DP groups need ",
               shared_bytes, " bytes of shared memory per block (at most ", kMaxDefaultSharedBytes,
               "); use fewer threads per block (EXPERTWIRE_BLOCK_THREADS)");
    dispatch_pull_kernel<Transport><<<shape.blocks, shape.threads, shared_bytes, stream>>>(args, transport);
  } else if constexpr (Transport::kMayPut) {
    dispatch_push_kernel<Transport>
        <<<shape.blocks, shape.threads, PushDispatchShared::bytes(args.ctx.layout), stream>>>(args, transport);
  }
  EW_CUDA_CHECK(cudaGetLastError());
}

template <class Transport>
void launch_dispatch(const DispatchArgs& args, const Transport& transport, LaunchShape shape, cudaStream_t stream) {
  in_object_mode(args.ctx.fault_tolerant, transport,
                 [&](const auto& in_mode) { launch_dispatch_in_mode(args, in_mode, shape, stream); });
}

// The pull combine when every peer's buffer is load/store reachable, else the push combine. Rows travel and are
// summed as ExpertT; expert_y holds SourceT (ExpertT, or float32).
template <class Transport, class OutT, class ExpertT, class SourceT>
void launch_combine_in_mode(const CombineArgs& args, const Transport& transport, LaunchShape shape,
                            cudaStream_t stream) {
  const uint64_t shared_bytes = CombineShared::bytes(args.ctx.layout);
  if (transport.load_store_only()) {
    combine_pull_kernel<Transport, OutT, ExpertT, SourceT>
        <<<shape.blocks, shape.threads, shared_bytes, stream>>>(args, transport);
  } else if constexpr (Transport::kMayPut) {
    combine_push_kernel<Transport, OutT, ExpertT, SourceT>
        <<<shape.blocks, shape.threads, shared_bytes, stream>>>(args, transport);
  }
  EW_CUDA_CHECK(cudaGetLastError());
}

template <class Transport, class OutT, class ExpertT, class SourceT = ExpertT>
void launch_combine_typed(const CombineArgs& args, const Transport& transport, LaunchShape shape, cudaStream_t stream) {
  in_object_mode(args.ctx.fault_tolerant, transport, [&](const auto& in_mode) {
    launch_combine_in_mode<std::decay_t<decltype(in_mode)>, OutT, ExpertT, SourceT>(args, in_mode, shape, stream);
  });
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
void launch_combine(const CombineArgs& args, const Transport& transport, ScalarType out_type, ScalarType expert_type,
                    LaunchShape shape, cudaStream_t stream) {
  switch (expert_type) {
    case ScalarType::kBFloat16:
      return launch_combine_for_expert<Transport, __nv_bfloat16>(args, transport, out_type, shape, stream);
    case ScalarType::kFloat16:
      return launch_combine_for_expert<Transport, __half>(args, transport, out_type, shape, stream);
    case ScalarType::kFloat32:  // rows travel as out_tokens' 16-bit type (the argument checks make it one)
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
