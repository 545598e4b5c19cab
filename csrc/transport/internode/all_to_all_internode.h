// All-to-all across nodes through NVSHMEM: the symmetric buffer comes from nvshmem_malloc; peers on this
// node are written with loads/stores through nvshmem_ptr, peers elsewhere with NVSHMEM puts and signals.
#pragma once

#include <cstdint>
#include <memory>

#include "symmem/nvshmem_runtime.h"
#include "transport/common/all_to_all.h"

namespace expertwire {

struct InternodeOptions {
  uint64_t timeout_ns = 0;    // 0: EXPERTWIRE_TIMEOUT_MS or 10 s
  uint32_t max_sm_count = 0;  // blocks per launch at most (pplx_kernels' max_sm_count); 0: one per SM
  bool force_puts = false;    // send every byte through NVSHMEM puts, even to peers on this node
};

class AllToAllInternode final : public AllToAll {
 public:
  // Validates the configuration, checks that the buffers fit NVSHMEM_SYMMETRIC_SIZE, and allocates them.
  // Collective: every rank constructs (and later destroys) its object together. NVSHMEM must be initialized.
  explicit AllToAllInternode(const AllToAllConfig& config, const InternodeOptions& options = {});

 private:
  void launch_dispatch(const device::DispatchArgs& args, cudaStream_t stream) override;
  void launch_combine(const device::CombineArgs& args, ScalarType out_type, ScalarType expert_type,
                      cudaStream_t stream) override;

  std::unique_ptr<NvshmemSymmetricBuffer> buffer_;
  // Whether the kernels run the puts protocol (push) rather than pulls: the same on every rank (see the
  // constructor).
  bool uses_puts_ = false;
};

}  // namespace expertwire
