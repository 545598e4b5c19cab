#include "core/ht_layout.h"
#include "device/ht_launch.cuh"
#include "expertwire/high_throughput.h"
#include "expertwire/intranode.h"
#include "symmem/ipc_buffer.h"
#include "transport/common/high_throughput_launch.h"
#include "transport/intranode/peer_transport.cuh"

namespace expertwire {

HighThroughputIntranode::HighThroughputIntranode(const HighThroughputConfig& config, const AllGatherBytes& all_gather,
                                                 const AllToAllOptions& options)
    : HighThroughputAllToAll(config) {
  EW_REQUIRE(bool(all_gather), "intranode: an all_gather function is required to exchange buffer handles");
  agree_and_prepare(options, device::PeerTransport::kMayPut, "intranode", int(config.rank), int(config.world_size),
                    all_gather, [&] { require_intranode_supported(options.force_puts, config.world_size, device()); });
  buffer_ =
      std::make_unique<IpcSymmetricBuffer>(symmetric_bytes(), int(config.rank), int(config.world_size), all_gather);
  set_symmetric_buffer(buffer_->local(), false);
}

HighThroughputIntranode::~HighThroughputIntranode() = default;

void HighThroughputIntranode::launch_route(const Launch& launch, cudaStream_t stream) {
  device::launch_ht_route(launch.args, device::PeerTransport{buffer_->device_peer_table()}, launch.shape, stream);
}

void HighThroughputIntranode::launch_data(const Launch& launch, cudaStream_t stream) {
  device::launch_ht_data(launch.args, device::PeerTransport{buffer_->device_peer_table()}, launch.shape, stream);
}

void HighThroughputIntranode::launch_combine(const Launch& launch, ScalarType type, cudaStream_t stream) {
  device::launch_ht_combine(launch.args, device::PeerTransport{buffer_->device_peer_table()}, type, launch.shape,
                            stream);
}

}  // namespace expertwire
