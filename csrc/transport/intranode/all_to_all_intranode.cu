#include "expertwire/intranode.h"

#include "core/error.h"
#include "device/launch.cuh"
#include "symmem/ipc_buffer.h"
#include "transport/common/agreement.h"
#include "transport/intranode/peer_transport.cuh"

namespace expertwire {

AllToAllIntranode::AllToAllIntranode(const AllToAllConfig& config, const AllGatherBytes& all_gather,
                                     const AllToAllOptions& options)
    : AllToAll(config) {
  EW_REQUIRE(bool(all_gather), "intranode: an all_gather function is required to exchange buffer handles");
  agree_and_prepare(options, device::PeerTransport::kMayPut, "intranode", int(config.rank), int(config.world_size),
                    all_gather, [&] { require_intranode_supported(options.force_puts, config.world_size, device()); });
  buffer_ = std::make_unique<IpcSymmetricBuffer>(layout().symmetric_bytes, int(config.rank), int(config.world_size),
                                                 all_gather);
  set_symmetric_buffer(buffer_->local());
}

AllToAllIntranode::~AllToAllIntranode() = default;

void AllToAllIntranode::launch_dispatch(const device::DispatchArgs& args, cudaStream_t stream) {
  device::launch_dispatch(args, device::PeerTransport{buffer_->device_peer_table()}, launch_shape(), stream);
}

void AllToAllIntranode::launch_combine(const device::CombineArgs& args, ScalarType out_type, ScalarType expert_type,
                                       cudaStream_t stream) {
  device::launch_combine(args, device::PeerTransport{buffer_->device_peer_table()}, out_type, expert_type,
                         launch_shape(), stream);
}

}  // namespace expertwire
