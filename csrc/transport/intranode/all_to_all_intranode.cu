#include "transport/intranode/all_to_all_intranode.h"

#include "device/all_to_all_kernels.cuh"
#include "transport/intranode/peer_transport.cuh"

namespace expertwire {

AllToAllIntranode::AllToAllIntranode(const AllToAllConfig& config, const AllGatherBytes& all_gather,
                                     const IntranodeOptions& options)
    : AllToAll(config, /*staging_rows_per_warp=*/0, options.timeout_ns, options.max_sm_count) {
  buffer_ = std::make_unique<IpcSymmetricBuffer>(layout().symmetric_bytes, int(config.rank), int(config.world_size),
                                                 all_gather);
  set_symmetric_buffer(buffer_->local());
}

void AllToAllIntranode::launch_dispatch(const device::DispatchArgs& args, cudaStream_t stream) {
  device::launch_dispatch(args, device::PeerTransport{buffer_->device_peer_table()}, launch_shape(), stream);
}

void AllToAllIntranode::launch_combine(const device::CombineArgs& args, ScalarType out_type, ScalarType expert_type,
                                       cudaStream_t stream) {
  device::launch_combine(args, device::PeerTransport{buffer_->device_peer_table()}, out_type, expert_type,
                         launch_shape(), stream);
}

}  // namespace expertwire
