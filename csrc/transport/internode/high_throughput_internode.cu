#include "core/ht_layout.h"
#include "device/ht_launch.cuh"
#include "expertwire/high_throughput.h"
#include "symmem/nvshmem_runtime.h"
#include "transport/common/high_throughput_launch.h"
#include "transport/internode/nvshmem_transport.cuh"

namespace expertwire {

HighThroughputInternode::HighThroughputInternode(const HighThroughputConfig& config, const AllToAllOptions& options)
    : HighThroughputAllToAll(config) {
  // NVSHMEM may belong to another library of this process (nvshmem4py): our kernels need it attached.
  nvshmem_attach_to_running();
  agree_and_prepare(
      options, device::NvshmemTransport::kMayPut, "internode", nvshmem_rank(), nvshmem_world_size(),
      nvshmem_all_gather_bytes,
      [&] { require_nvshmem_supports("HighThroughputConfig", config.world_size, config.rank, symmetric_bytes()); });
  buffer_ = std::make_unique<NvshmemSymmetricBuffer>(symmetric_bytes(), options.force_puts);
  // Every rank must run the same protocol (pull or push): one rank that needs puts makes every rank push.
  uses_puts_ = nvshmem_on_any_rank(buffer_->uses_puts());
  set_symmetric_buffer(buffer_->local(), uses_puts_);
}

HighThroughputInternode::~HighThroughputInternode() = default;

void HighThroughputInternode::launch_route(const Launch& launch, cudaStream_t stream) {
  const device::NvshmemTransport transport{buffer_->local(), buffer_->device_peer_table(), uses_puts_};
  device::launch_ht_route(launch.args, transport, launch.shape, stream);
}

void HighThroughputInternode::launch_data(const Launch& launch, cudaStream_t stream) {
  const device::NvshmemTransport transport{buffer_->local(), buffer_->device_peer_table(), uses_puts_};
  device::launch_ht_data(launch.args, transport, launch.shape, stream);
}

void HighThroughputInternode::launch_combine(const Launch& launch, ScalarType type, cudaStream_t stream) {
  const device::NvshmemTransport transport{buffer_->local(), buffer_->device_peer_table(), uses_puts_};
  device::launch_ht_combine(launch.args, transport, type, launch.shape, stream);
}

}  // namespace expertwire
