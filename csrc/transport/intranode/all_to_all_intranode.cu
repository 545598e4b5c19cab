#include "transport/intranode/all_to_all_intranode.h"

#include <cstring>
#include <string>
#include <vector>

#include "device/all_to_all_kernels.cuh"
#include "transport/intranode/peer_transport.cuh"

namespace expertwire {

AllToAllIntranode::AllToAllIntranode(const AllToAllConfig& config, const AllGatherBytes& all_gather,
                                     const IntranodeOptions& options)
    : AllToAll(config, /*staging_rows_per_warp=*/0, options.timeout_ns, options.max_sm_count) {
  buffer_ = std::make_unique<IpcSymmetricBuffer>(layout().symmetric_bytes, int(config.rank), int(config.world_size),
                                                 all_gather);
  // The buffer exchange compares sizes only: layouts can differ at one size (scale bytes padded alike). Every
  // rank sees every signature, so all throw or none does; no peer has written into a buffer yet.
  const LayoutSignature own = layout_signature(layout());
  const std::vector<std::string> gathered = all_gather(std::string(reinterpret_cast<const char*>(&own), sizeof(own)));
  EW_REQUIRE(int64_t(gathered.size()) == config.world_size, "intranode: all_gather returned ", gathered.size(),
             " entries, expected world_size=", config.world_size);
  std::vector<LayoutSignature> by_rank(gathered.size());
  for (size_t rank = 0; rank < gathered.size(); ++rank) {
    EW_REQUIRE(gathered[rank].size() == sizeof(LayoutSignature), "intranode: entry ", rank, " of all_gather holds ",
               gathered[rank].size(), " bytes of layout signature, expected ", sizeof(LayoutSignature));
    std::memcpy(&by_rank[rank], gathered[rank].data(), sizeof(LayoutSignature));
  }
  require_same_layout(by_rank);
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
