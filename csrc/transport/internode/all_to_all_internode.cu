#include "transport/internode/all_to_all_internode.h"

#include <algorithm>
#include <exception>
#include <vector>

#include "device/all_to_all_kernels.cuh"
#include "transport/internode/nvshmem_transport.cuh"

namespace expertwire {

AllToAllInternode::AllToAllInternode(const AllToAllConfig& config, const InternodeOptions& options)
    : AllToAll(config, /*staging_rows_per_warp=*/1, options.timeout_ns, options.max_sm_count) {
  require_nvshmem_initialized();
  // What could stop this rank alone is checked on every rank together: a rank that threw here while the others
  // went on would leave them in NVSHMEM's next collective, which has no timeout. So each rank exchanges whether
  // its own checks passed, and its layout signature, and all throw or none does.
  std::exception_ptr own_error;
  try {
    EW_REQUIRE(nvshmem_world_size() == config.world_size, "AllToAllConfig.world_size must equal NVSHMEM's ",
               nvshmem_world_size(), " ranks, got ", config.world_size);
    EW_REQUIRE(nvshmem_rank() == config.rank, "AllToAllConfig.rank must equal this process's NVSHMEM rank ",
               nvshmem_rank(), ", got ", config.rank);
    require_fits_symmetric_heap(layout(), symmetric_heap_bytes_from_env());
  } catch (const ConfigError&) {
    own_error = std::current_exception();
  }
  const LayoutSignature own = layout_signature(layout());
  std::vector<uint64_t> words(own.words, own.words + LayoutSignature::kWords);
  words.push_back(own_error ? 1 : 0);
  std::vector<LayoutSignature> by_rank;
  int failed_rank = -1;
  const std::vector<std::vector<uint64_t>> gathered = nvshmem_all_gather_words(words);
  for (size_t rank = 0; rank < gathered.size(); ++rank) {
    if (gathered[rank].back() != 0 && failed_rank < 0) failed_rank = int(rank);
    by_rank.push_back(LayoutSignature{});
    std::copy(gathered[rank].begin(), gathered[rank].begin() + LayoutSignature::kWords, by_rank.back().words);
  }
  if (own_error) std::rethrow_exception(own_error);
  EW_REQUIRE(failed_rank < 0, "internode: rank ", failed_rank,
             " could not construct its all-to-all (its own error says why), so no rank does");
  require_same_layout(by_rank);
  buffer_ = std::make_unique<NvshmemSymmetricBuffer>(layout().symmetric_bytes, options.force_puts);
  set_symmetric_buffer(buffer_->local());
  // The kernels pull where every peer is load/store reachable and push otherwise, and every rank must run the
  // same protocol: a rank that pulled while another pushed would wait out its timeout. One rank that reaches a
  // peer only through puts (or was told to use them) makes every rank push; mapped peers still get stores.
  uses_puts_ = nvshmem_on_any_rank(buffer_->uses_puts());
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
