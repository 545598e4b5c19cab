#include "expertwire/internode.h"

#include "core/error.h"
#include "device/launch.cuh"
#include "symmem/nvshmem_runtime.h"
#include "transport/common/agreement.h"
#include "transport/common/launch_shape.h"
#include "transport/internode/nvshmem_transport.cuh"

namespace expertwire {

AllToAllInternode::AllToAllInternode(const AllToAllConfig& config, const AllToAllOptions& options) : AllToAll(config) {
  // NVSHMEM may belong to another library of this process (nvshmem4py): our kernels need it attached.
  nvshmem_attach_to_running();
  // NVSHMEM's all-gather returns the ranks in its own order, whatever a rank's configuration says.
  agree_and_prepare(
      options, device::NvshmemTransport::kMayPut, "internode", nvshmem_rank(), nvshmem_world_size(),
      nvshmem_all_gather_bytes,
      [&] { require_nvshmem_supports("AllToAllConfig", config.world_size, config.rank, layout().symmetric_bytes); });
  buffer_ = std::make_unique<NvshmemSymmetricBuffer>(layout().symmetric_bytes, options.force_puts);
  set_symmetric_buffer(buffer_->local());
  // The kernels pull where every peer is load/store reachable and push otherwise, and every rank must run the
  // same protocol: a rank that pulled while another pushed would wait out its timeout. One rank that reaches a
  // peer only through puts (or was told to use them) makes every rank push; mapped peers still get stores.
  uses_puts_ = nvshmem_on_any_rank(buffer_->uses_puts());
}

AllToAllInternode::~AllToAllInternode() = default;

uint64_t AllToAllInternode::symmetric_bytes(const AllToAllConfig& config, const AllToAllOptions& options) {
  config.validate();
  return make_buffer_layout(config, default_launch_shape(options.max_sm_count).warps()).symmetric_bytes;
}

void AllToAllInternode::launch_dispatch(const device::DispatchArgs& args, cudaStream_t stream) {
  const device::NvshmemTransport transport{buffer_->local(), buffer_->device_peer_table(), uses_puts_};
  device::launch_dispatch(args, transport, launch_shape(), stream);
}

void AllToAllInternode::launch_combine(const device::CombineArgs& args, ScalarType out_type, ScalarType expert_type,
                                       cudaStream_t stream) {
  const device::NvshmemTransport transport{buffer_->local(), buffer_->device_peer_table(), uses_puts_};
  device::launch_combine(args, transport, out_type, expert_type, launch_shape(), stream);
}

}  // namespace expertwire
