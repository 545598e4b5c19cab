// Host launchers of the high-throughput kernels. Each transport's translation unit includes this with its own
// Transport.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "core/cuda_utils.h"
#include "core/error.h"
#include "device/ht_args.h"
#include "device/ht_combine.cuh"
#include "device/ht_dispatch.cuh"
#include "device/ht_route.cuh"
#include "expertwire/all_to_all.h"

namespace expertwire::device {

// The count exchange: route (when there are tokens), publish, offsets; the last two in the object's mode (InMode).
template <class Transport>
void launch_ht_route(const HtArgs& args, const Transport& transport, LaunchShape shape, cudaStream_t stream) {
  const uint32_t route_blocks = (args.m + kRouteBlockTokens - 1) / kRouteBlockTokens;
  if (route_blocks != 0) {
    const uint64_t shared = route_shared_bytes(args.l);
    EW_REQUIRE(shared <= 227 * 1024, "high-throughput dispatch: ", args.l.num_experts, " experts and top-",
               args.l.experts_per_token, " need ", shared, " bytes of shared memory per route block (at most 232448)");
    EW_CUDA_CHECK(cudaFuncSetAttribute(ht_route_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared)));
    ht_route_kernel<<<route_blocks, kRouteBlockTokens, shared, stream>>>(args);
    EW_CUDA_CHECK(cudaGetLastError());
  }
  const uint64_t offsets_shared = offsets_shared_bytes(args.l);
  EW_REQUIRE(offsets_shared <= 227 * 1024, "high-throughput dispatch: ", args.l.world_size, " ranks and ",
             args.l.num_experts, " experts need ", offsets_shared,
             " bytes of shared memory for the count rows (at most 232448)");
  in_object_mode(args.fault_tolerant, transport, [&](const auto& in_mode) {
    using InModeTransport = std::decay_t<decltype(in_mode)>;
    const uint64_t counters_bytes = uint64_t(args.l.world_size + args.l.num_experts) * sizeof(uint32_t);
    EW_CUDA_CHECK(cudaFuncSetAttribute(ht_publish_kernel<InModeTransport>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       int(counters_bytes)));
    ht_publish_kernel<InModeTransport><<<shape.blocks, shape.threads, counters_bytes, stream>>>(args, in_mode);
    EW_CUDA_CHECK(cudaGetLastError());
    EW_CUDA_CHECK(cudaFuncSetAttribute(ht_offsets_kernel<InModeTransport>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       int(offsets_shared)));
    ht_offsets_kernel<InModeTransport><<<1, kMaxBlockThreads, offsets_shared, stream>>>(args, in_mode);
    EW_CUDA_CHECK(cudaGetLastError());
  });
}

template <class Transport>
void launch_ht_data(const HtArgs& args, const Transport& transport, LaunchShape shape, cudaStream_t stream) {
  in_object_mode(args.fault_tolerant, transport, [&](const auto& in_mode) {
    ht_data_kernel<std::decay_t<decltype(in_mode)>><<<shape.blocks, shape.threads, 0, stream>>>(args, in_mode);
  });
  EW_CUDA_CHECK(cudaGetLastError());
}

template <class Transport>
void launch_ht_combine(const HtArgs& args, const Transport& transport, ScalarType type, LaunchShape shape,
                       cudaStream_t stream) {
  in_object_mode(args.fault_tolerant, transport, [&](const auto& in_mode) {
    using InModeTransport = std::decay_t<decltype(in_mode)>;
    switch (type) {
      case ScalarType::kBFloat16:
        ht_combine_kernel<InModeTransport, __nv_bfloat16><<<shape.blocks, shape.threads, 0, stream>>>(args, in_mode);
        break;
      case ScalarType::kFloat16:
        ht_combine_kernel<InModeTransport, __half><<<shape.blocks, shape.threads, 0, stream>>>(args, in_mode);
        break;
      case ScalarType::kFloat32:
        ht_combine_kernel<InModeTransport, float><<<shape.blocks, shape.threads, 0, stream>>>(args, in_mode);
        break;
    }
  });
  EW_CUDA_CHECK(cudaGetLastError());
}

}  // namespace expertwire::device
